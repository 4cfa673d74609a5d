"""skilllens artifacts as edits for the lm-eval bridge: load any saved method by its ``kind``
(fingerprint checked against the model) and apply it reversibly.

Kinds: ``neuron_adjust`` (NeuronAdjuster), ``selective_pruning`` (SelectivePruner),
``key_space`` (KeySpaceDetector: an abstainer, it changes no activation), ``concept_ablation`` /
``column_edit`` (ConceptAblation / ColumnEdit: a weight edit restored on exit) and
``graft-mask`` (GraftLocalizer: the fine-tuned values written at the mask, restored on exit).
"""
from __future__ import annotations

import contextlib
import importlib
import os

from skilllens.errors import ArtifactError

#: artifact kind -> (module, class) of the method that saved it
KINDS = {"neuron_adjust": ("skilllens.unlearning.neuron_adjust", "NeuronAdjuster"),
         "selective_pruning": ("skilllens.unlearning.selective_pruning", "SelectivePruner"),
         "key_space": ("skilllens.unlearning.key_space", "KeySpaceDetector"),
         "concept_ablation": ("skilllens.concepts.ablation", "ConceptAblation"),
         "column_edit": ("skilllens.concepts.ablation", "ColumnEdit"),
         "graft-mask": ("skilllens.grafting.localizer", "GraftLocalizer")}


def load_edit(path: str | os.PathLike, lm):
    """The method saved at ``path``, loaded onto ``lm`` (``LoadedModel``); its fingerprint must
    match ``lm`` (:class:`~skilllens.errors.FingerprintMismatchError` otherwise). Raises
    ArtifactError for a file of another kind."""
    from skilllens.core.artifacts import read_metadata

    kind = read_metadata(path).get("kind")
    if kind not in KINDS:
        raise ArtifactError(f"{path} holds a {kind!r} artifact, which is no model edit; the "
                            f"bridge applies {', '.join(KINDS)}")
    module, cls = KINDS[kind]
    obj = getattr(importlib.import_module(module), cls).load(path, lm)
    if kind == "graft-mask":  # GraftLocalizer.load checks the fingerprint only when given one
        obj._check_model(lm.model)
    return obj


def parse_edits(edits) -> list[str]:
    """``"a.safetensors+b.safetensors"`` (lm-eval's ``--model_args`` split on ``,``) or a list."""
    if edits is None or edits == "":
        return []
    if isinstance(edits, (str, os.PathLike)):
        return [p for p in str(edits).split("+") if p.strip()]
    return [str(p) for p in edits]


def is_abstainer(edit) -> bool:
    """True for methods that act by abstaining (KSD): ``abstains(lm, items)``."""
    return callable(getattr(edit, "abstains", None))


@contextlib.contextmanager
def applied(edits: list, lm):
    """Every edit active inside the block (graft masks through ``grafted``), all undone on exit."""
    with contextlib.ExitStack() as stack:
        for e in edits:
            stack.enter_context(e.grafted(lm.model) if hasattr(e, "grafted") and
                                not hasattr(e, "applied") else e.applied(lm))
        yield
