"""Functions the YAML task configs in this folder name with ``!function utils.NAME``."""
from skilllens.lmeval.docs import (load_gsm8k, load_mmlu_redux, load_xquad,  # noqa: F401
                                   process_gsm8k, process_multiple_choice, process_xquad)


def load_xquad_en(**kw):
    return load_xquad("en", **kw)


def load_xquad_de(**kw):
    return load_xquad("de", **kw)
