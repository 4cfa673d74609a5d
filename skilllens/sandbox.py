"""Run untrusted (model-written) Python in a separate, limited process.

Each run: ``sys.executable -I`` (isolated mode: no user site, no ``PYTHONPATH``, no cwd on
``sys.path``) in a new session/process group, in a fresh temporary folder that is deleted
afterwards, stdin closed, a minimal environment, and these limits:

* resource limits (soft = hard, so they cannot be raised again) set by the guard before the
  user code runs: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``,
  ``RLIMIT_CORE = 0`` (no core files), ``RLIMIT_FSIZE`` (file size), ``RLIMIT_NPROC`` (only
  when ``limit_processes`` is given: it counts all processes of the user, so no safe default);
* a wall-clock timeout after which the whole process group gets ``SIGKILL``;
* no network, in two layers: where unprivileged user namespaces work (probed once),
  ``unshare --user --net`` gives the process an empty network namespace (no interfaces but a
  downed loopback); in every case a guard installed by an audit hook (:pep:`578`) before the
  user code refuses socket creation/connection/name lookup, ``fork``/``exec``/``spawn``/
  ``subprocess``/``os.system`` and ``ctypes``. :attr:`SandboxResult.isolation` says which
  layers were active. This is best-effort isolation for benchmark code, not a security boundary
  against a determined attacker.

>>> run_python("print(1 + 1)").stdout.strip()
'2'
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SkillLensError

TAIL = 2000

_GUARD = r'''
import sys
def _skilllens_guard(limits):
    import resource
    for name, value in limits:
        which = getattr(resource, name, None)
        if which is not None:
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError):
                pass
    blocked_prefix = ("socket.", "subprocess.", "os.fork", "os.exec", "os.spawn", "os.posix_spawn",
                      "os.system", "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg",
                      "resource.setrlimit", "resource.prlimit", "sys.addaudithook",
                      "sys.remote_exec", "webbrowser.")
    def hook(event, args):
        if event.startswith(blocked_prefix):
            raise PermissionError(f"sandbox: {event} is not allowed")
    sys.addaudithook(hook)
_skilllens_guard(%r)
del _skilllens_guard
import runpy as _runpy
_runpy.run_path("solution.py", run_name="__main__")
'''


class SandboxError(SkillLensError):
    """The sandbox itself could not run (not raised for failing or misbehaving user code)."""


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run; ``passed`` is True only for exit status 0 within limits."""

    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    duration_s: float
    isolation: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def reason(self) -> str:
        if self.passed:
            return "passed"
        if self.timed_out:
            return "timed out"
        if self.returncode is not None and self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        last = self.stderr.strip().splitlines()[-1:] or [f"exit status {self.returncode}"]
        return last[0][:200]


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """True when ``unshare --user --net`` works for this unprivileged user (probed once)."""
    exe = shutil.which("unshare")
    if not exe or not sys.platform.startswith("linux"):
        return False
    try:
        r = subprocess.run([exe, "--user", "--map-root-user", "--net", sys.executable, "-I", "-c",
                            "import socket; print(len(socket.if_nameindex()))"],
                           capture_output=True, timeout=10, text=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and r.stdout.strip() in ("0", "1")


def _limits(memory_mb: int, cpu_s: int, file_mb: int, nproc: int | None) -> list:
    """(resource name, value) pairs the guard sets as soft = hard limits before the user code."""
    lims = [("RLIMIT_CORE", 0), ("RLIMIT_CPU", cpu_s), ("RLIMIT_FSIZE", file_mb << 20)]
    if memory_mb:
        lims.append(("RLIMIT_AS", memory_mb << 20))
    if nproc is not None:
        lims.append(("RLIMIT_NPROC", nproc))
    return lims


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_python(code: str, *, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16,
               limit_processes: int | None = None, network_namespace: bool | None = None
               ) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandboxed ``python -I``; never raises for bad code.

    ``timeout``: wall-clock seconds (CPU limit = ``ceil(timeout) + 1``); ``memory_mb``: address
    space limit (0 = none); ``network_namespace``: None = use it when available.
    """
    if timeout <= 0:
        raise SandboxError(f"timeout must be positive, got {timeout}")
    use_ns = network_namespace_available() if network_namespace is None else network_namespace
    isolation = ("netns+" if use_ns else "") + "audit-hook"
    workdir = Path(tempfile.mkdtemp(prefix="skilllens-sandbox-"))
    try:
        (workdir / "solution.py").write_text(code, encoding="utf-8")
        limits = _limits(memory_mb, int(timeout) + 2, file_mb, limit_processes)
        (workdir / "_guard.py").write_text(_GUARD % (limits,), encoding="utf-8")
        cmd = [sys.executable, "-I", "-B", "_guard.py"]
        if use_ns:
            cmd = [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--net"] + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        with open(workdir / "stdout.txt", "wb") as out, open(workdir / "stderr.txt", "wb") as err:
            try:
                proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err, env=env, close_fds=True,
                                        start_new_session=True)
            except OSError as e:
                raise SandboxError(f"cannot start the sandbox process ({e}); check that "
                                   f"{sys.executable} runs") from None
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group, also when it exited
                except (ProcessLookupError, PermissionError):
                    pass
                rc_final = proc.wait()
            rc = None if timed_out else rc_final
        duration = time.monotonic() - start
        return SandboxResult(passed=(not timed_out and rc == 0), returncode=rc,
                             timed_out=timed_out, stdout=_tail(workdir / "stdout.txt"),
                             stderr=_tail(workdir / "stderr.txt"), duration_s=round(duration, 3),
                             isolation=isolation)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """HumanEval check program: prompt + completion, the ``check`` function, ``check(entry)``."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(code: str, test_list: list[str], setup: str = "") -> str:
    """MBPP check program: setup code, the candidate code, then its ``assert`` lines."""
    return f"{setup}\n{code}\n\n" + "\n".join(test_list) + "\n"


def check_item(item, completion: str, **limits) -> SandboxResult:
    """Run a code item's tests (HumanEval ``test``/``entry_point`` or MBPP ``test_list`` in
    ``item.meta``) against ``completion`` (what the model wrote after the prompt)."""
    meta = item.meta
    if "test" in meta and "entry_point" in meta:
        program = humaneval_program(item.prompt, completion, meta["test"], meta["entry_point"])
    elif "test_list" in meta:
        program = mbpp_program(completion, meta["test_list"], meta.get("test_setup_code", ""))
    else:
        raise SandboxError(f"item {item.id!r} has no tests (meta 'test'+'entry_point' or "
                           f"'test_list'); pass@1 needs a HumanEval or MBPP skill")
    return run_python(program, **limits)
