"""Skill data: :class:`Item` and :class:`Skill`, built-in names and files, the packaged data.

- :mod:`~skilllens.data.items`: the data types.
- :mod:`~skilllens.data.sources`: where files come from (``--data-dir``, ``$SKILLLENS_DATA``, the
  packaged data, the hub when allowed).
- :mod:`~skilllens.data.formats`: upstream formats (GSM8K, HumanEval, MBPP, MMLU, SQuAD/XQuAD...).
- :mod:`~skilllens.data.skills`: specs -> skills (:func:`load_skill`, :func:`as_skill`,
  :func:`resolve_skills`), probe/eval splits.

>>> from skilllens.data import as_skill
>>> sk = as_skill("gsm8k")          # the probe part: no evaluation item is ever fitted on
>>> sk.name, all(it.id.startswith("gsm8k/train") for it in sk)
('gsm8k', True)
"""
from skilllens.data.formats import (FAMILIES, ROWS, data_sources, load_hub, mbpp_prompt,
                                    mmlu_prompt, open_text, read_text)
from skilllens.data.items import Item, Skill
from skilllens.data.skills import (LOADERS, PARTS, as_skill, combine_skills, from_texts, is_spec,
                                   load_skill, resolve_skills, sample_skill, split_skill)
from skilllens.data.sources import (BUILTIN_SKILLS, CHOICES, COMPRESSED, HUB_PREFIX, HUB_REFS,
                                    PACKAGED, XQUAD_LANGS, data_dir, data_roots, describe_source,
                                    find_data_file, hub_allowed, plain_name)

__all__ = ["Item", "Skill", "PARTS", "load_skill", "as_skill", "resolve_skills", "combine_skills",
           "from_texts", "is_spec", "sample_skill", "split_skill", "LOADERS", "FAMILIES", "ROWS",
           "load_hub", "data_sources", "mbpp_prompt", "mmlu_prompt", "open_text", "read_text",
           "BUILTIN_SKILLS", "XQUAD_LANGS", "CHOICES", "COMPRESSED", "HUB_PREFIX", "HUB_REFS",
           "PACKAGED", "data_dir", "data_roots", "describe_source", "find_data_file",
           "hub_allowed", "plain_name"]
