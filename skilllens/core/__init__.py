"""The model side: load a model, find its FFN sites, hook them, run data through, collect.

- :mod:`~skilllens.core.architectures`: :class:`ModelAdapter` (where each architecture keeps its
  blocks, FFN and activation sites) and :func:`register_architecture`.
- :mod:`~skilllens.core.models`: :func:`load_model` (embedded SmolLM2, hub ids, folders, GGUF, tiny
  test models); :mod:`~skilllens.core.loaded_model`, :mod:`~skilllens.core.fingerprint`.
- :mod:`~skilllens.core.hooks`: the one mechanism to read and edit module inputs/outputs.
- :mod:`~skilllens.core.batching`: joint prompt/answer tokenisation, length-sorted batches.
- :mod:`~skilllens.core.collect`: data -> hooks -> :class:`~skilllens.stats.NeuronStats`;
  :mod:`~skilllens.core.distributed` merges collections across ranks.
- :mod:`~skilllens.core.artifacts`: safetensors + JSON files stamped with the model fingerprint.
"""
