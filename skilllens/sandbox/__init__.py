"""Run model-generated Python under kernel-enforced isolation (rlimits, Landlock, seccomp,
namespaces): :func:`run_python`. :mod:`~skilllens.sandbox.child` is the code the isolated
process runs before the untrusted program; :mod:`~skilllens.sandbox.runner` starts it.

>>> from skilllens.sandbox import run_python
>>> run_python("print(6 * 7)").stdout.strip()
'42'
"""
from skilllens.sandbox.runner import (KERNEL_LAYERS, REQUIRE, TAIL, SandboxError, SandboxResult,
                                      check_item, humaneval_program, kernel_layers, mbpp_program,
                                      network_namespace_available, run_python)

__all__ = ["run_python", "SandboxResult", "SandboxError", "kernel_layers",
           "network_namespace_available", "check_item", "humaneval_program", "mbpp_program",
           "KERNEL_LAYERS", "REQUIRE", "TAIL"]
