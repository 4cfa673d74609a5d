"""Skill localization by model grafting (Panigrahi et al. 2023).

- :mod:`~skilllens.grafting.tasks`: the tasks a skill is measured on (:func:`build_task`).
- :mod:`~skilllens.grafting.finetune`: fine-tune a copy on a task (:class:`FineTuneConfig`).
- :mod:`~skilllens.grafting.workspace`: top-k masks and the in-place soft graft.
- :mod:`~skilllens.grafting.localizer`: :class:`GraftLocalizer` (``fit`` / ``grafted`` /
  ``save`` / ``load``).
- :mod:`~skilllens.grafting.metrics`: overlap of masks across tasks and their figures.
"""
from skilllens.grafting.localizer import KIND, OPTIMIZERS, GraftFitResult, GraftLocalizer
from skilllens.grafting.workspace import (GraftError, GraftWorkspace, check_same_shapes,
                                          global_topk_masks, soft_graft, soft_mask)

__all__ = ["GraftLocalizer", "GraftFitResult", "GraftError", "GraftWorkspace",
           "check_same_shapes", "global_topk_masks", "soft_graft", "soft_mask", "KIND",
           "OPTIMIZERS"]
