"""Probe/eval parts of a skill for the audits, and baseline scores with abstentions applied."""
from __future__ import annotations

from skilllens.data import Skill, load_skill, sample_skill, split_skill
from skilllens.errors import SkillLensError


def skill_parts(spec: str, n_probe: int, n_eval: int, seed: int, data_dir=None) -> tuple[Skill, Skill]:
    """Disjoint probe and eval samples of one skill (checked: no shared ids or prompts); each
    says which part and how many of how many items it holds (``Skill.describe()``)."""
    probe, evals = split_skill(load_skill(spec, data_dir, part="all"))
    probe, evals = sample_skill(probe, n_probe, seed), sample_skill(evals, n_eval, seed)
    if {it.id for it in probe} & {it.id for it in evals} or \
            {it.prompt for it in probe} & {it.prompt for it in evals}:
        raise SkillLensError(f"probe and eval items of {spec!r} overlap; use disjoint files")
    return probe, evals


def with_abstention(base, mask: list[bool]):
    """A baseline ``SkillScore`` with the abstained items scored as ``evaluate`` scores them
    (0, or ``abstain_nll`` for NLL; :mod:`skilllens.eval.evaluation`), i.e. what ``evaluate`` returns
    with an abstainer on an unmodified model. Same aggregation code path as ``evaluate``."""
    from skilllens.eval import abstained_row, summarize

    if len(mask) != len(base.per_item):
        raise SkillLensError(f"abstention mask has {len(mask)} entries for "
                             f"{len(base.per_item)} items")
    rows = [{**r, **abstained_row(base.metric, base.abstain_nll), "abstained": True} if a
            else dict(r) for r, a in zip(base.per_item, mask)]
    return summarize(base.skill, base.metric, rows, base.abstain_nll)
