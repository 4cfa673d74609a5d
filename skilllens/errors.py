"""Exceptions raised by skilllens. Every message names the fix."""


class SkillLensError(Exception):
    """Base class: the CLI prints these as one-line errors (exit code 2)."""


class ModelSpecError(SkillLensError):
    """A model spec could not be resolved or loaded."""


class UnknownArchitectureError(SkillLensError):
    """The model's architecture has no FFN site mapping."""


class SiteError(SkillLensError):
    """Unknown site, backend, or a layer index out of range."""


class DataError(SkillLensError):
    """A data set is missing, empty or in the wrong format."""


class ArtifactError(SkillLensError):
    """An artifact file is missing, malformed or cannot be written."""


class FingerprintMismatchError(ArtifactError):
    """An artifact was made on another model than the one it is applied to."""
