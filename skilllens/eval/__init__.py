"""Measuring a skill: teacher-forced and generated scores, and the one generation loop.

- :mod:`~skilllens.eval.evaluation`: :func:`evaluate` (token accuracy, NLL, exact match,
  pass@1, F1) with abstention counted in every mean.
- :mod:`~skilllens.eval.scores`: :class:`SkillScore`, :func:`relative`, summaries.
- :mod:`~skilllens.eval.generation`: batched, left-padded, KV-cached greedy generation.
- :mod:`~skilllens.eval.scoring`: answer normalisation, exact match, F1.
Generated code is run by :mod:`skilllens.sandbox`.
"""
from skilllens.eval.evaluation import (CODE_STOPS, GSM8K_STOPS, MAX_NEW_TOKENS, MBPP_STOPS,
                                       QA_STOPS, abstain_nll, evaluate, fewshot_prefix,
                                       strip_calculator, teacher_forced)
from skilllens.eval.generation import cut_at_stops, generate_texts, greedy_generate
from skilllens.eval.scores import (LOWER_IS_BETTER, METRICS, TEACHER_FORCED, SkillScore,
                                   abstained_row, higher_is_better, relative, summarize)

__all__ = ["evaluate", "teacher_forced", "abstain_nll", "fewshot_prefix", "strip_calculator",
           "greedy_generate", "generate_texts", "cut_at_stops", "SkillScore", "relative",
           "higher_is_better", "summarize", "abstained_row", "METRICS", "TEACHER_FORCED",
           "LOWER_IS_BETTER", "CODE_STOPS", "MBPP_STOPS", "GSM8K_STOPS", "QA_STOPS",
           "MAX_NEW_TOKENS"]
