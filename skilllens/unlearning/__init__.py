"""Removing a skill while keeping the others, and auditing the result.

- :mod:`~skilllens.unlearning.neuron_adjust`: :class:`NeuronAdjuster` (Li et al. 2025).
- :mod:`~skilllens.unlearning.key_space`: :class:`KeySpaceDetector` hypercubes (Li et al. 2025).
- :mod:`~skilllens.unlearning.selective_pruning`: :class:`SelectivePruner` (baseline).
- :mod:`~skilllens.unlearning.experts`: :class:`ExpertDeactivator` and per-skill routing
  statistics (mixture-of-experts models).
- :mod:`~skilllens.unlearning.selection`: top-percent neuron selection shared by the methods.
- :mod:`~skilllens.unlearning.audit`: :func:`run_audit` (fit, apply, evaluate, report);
  :mod:`~skilllens.unlearning.report` and :mod:`~skilllens.unlearning.figures` draw from saved
  results.
"""
