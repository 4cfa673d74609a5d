"""Run untrusted (model-written) Python in a separate process that the kernel confines.

Each run: ``sys.executable -I -B`` in a new session (process group) whose working folder and
``HOME``/``TMPDIR`` are a fresh temporary folder, deleted afterwards; stdin closed; an environment
with nothing of the parent's; stdout/stderr go to files outside that folder. Before any user code
runs, the child (:mod:`skilllens.sandbox.child`) applies, in order:

* ``rlimits`` (soft = hard): address space, CPU, file size, open files, core files 0, processes;
* ``nocaps`` (when the parent is root): every capability dropped, ``no_new_privs`` set;
* ``landlock``: read-only access to the Python installation, ``sys.path`` and system libraries,
  read-write access only to the run's folder; no TCP bind/connect; with Landlock ABI >= 6 no
  signals or abstract Unix sockets across the sandbox boundary;
* ``seccomp``: a BPF filter refusing (``EPERM``) process creation other than threads, exec,
  ``socket``/``connect``/``bind``, ``ptrace``, signals to other processes, setting limits,
  mounts and namespaces, ``io_uring``, chmod/chown/xattr and kernel-level calls;
* ``audit-hook``: a :pep:`578` hook refusing sockets, subprocesses and ctypes; Python code can
  switch this one off, the kernel layers above it it cannot.

Optionally ``netns``: ``unshare --user --net`` gives the child an empty network namespace where
unprivileged user namespaces work. The wall-clock timeout kills the whole process group.
:attr:`SandboxResult.isolation` lists the layers that held for the run (e.g.
``"rlimits+nocaps+landlock+seccomp+netns+audit-hook"``); a missing kernel layer is reported once
as a :class:`RuntimeWarning`, and ``require="strict"`` refuses to run code without both Landlock
and seccomp. See the README's "Security note" for what this does and does not promise.

>>> run_python("print(1 + 1)").stdout.strip()
'2'
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from skilllens.io import JsonRecord
from skilllens.errors import SkillLensError

TAIL = 2000
KERNEL_LAYERS = ("landlock", "seccomp")
REQUIRE = ("best-effort", "strict")
_CHILD_SOURCE = (Path(__file__).with_name("child.py")).read_text(encoding="utf-8")
_WARNED: set = set()


class SandboxError(SkillLensError):
    """The sandbox itself could not run (not raised for failing or misbehaving user code)."""


@dataclass
class SandboxResult(JsonRecord):
    """Outcome of one sandboxed run. ``passed`` is True only when the program ran to its last
    line (``completed``: the harness's completion marker, a random nonce the program never
    sees, arrived; see :mod:`skilllens.sandbox.child`) and the process exited with status 0
    within the limits. An early ``sys.exit(0)``, ``exit()``, ``os._exit(0)`` or a signal to
    itself is therefore a failure, also when the exit status is 0."""

    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    duration_s: float
    isolation: str
    completed: bool = False

    @property
    def reason(self) -> str:
        if self.passed:
            return "passed"
        if self.timed_out:
            return "timed out"
        if self.returncode == 0 and not self.completed:
            return "exited before the end of the program (the checks did not all run)"
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


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def kernel_layers() -> dict:
    """Which kernel layers this machine offers: ``{"landlock": reason or "", "seccomp": ...}``
    (an empty string means available; probed once, in the parent, without restricting it)."""
    out = {"landlock": "", "seccomp": ""}
    if not sys.platform.startswith("linux"):
        return {k: "not Linux" for k in out}
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        abi = libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1))
        if abi < 1:
            out["landlock"] = (f"Landlock is not enabled in this kernel "
                               f"({os.strerror(ctypes.get_errno())})")
    except (OSError, AttributeError) as e:
        out["landlock"] = f"cannot call the Landlock syscalls ({e})"
    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        out["seccomp"] = "libseccomp.so.2 is not installed (Debian: apt-get install libseccomp2)"
    return out


def _limits(memory_mb: int, cpu_s: int, file_mb: int, nproc: int | None) -> list:
    """(resource name, value) pairs the child sets as soft = hard limits before the user code.

    Processes: ``nproc`` if given, else the machine's current task count + 64 (from
    /proc/loadavg; the limit counts all tasks of the user, threads included, so this bounds a
    thread bomb without failing honest code; the kernel does not apply it to root)."""
    if nproc is None:
        try:
            nproc = int(Path("/proc/loadavg").read_text().split()[3].split("/")[1]) + 64
        except (OSError, IndexError, ValueError):
            nproc = 4096
    lims = [("RLIMIT_CORE", 0), ("RLIMIT_CPU", cpu_s), ("RLIMIT_FSIZE", file_mb << 20),
            ("RLIMIT_NOFILE", 256), ("RLIMIT_NPROC", nproc)]
    if memory_mb:
        lims.append(("RLIMIT_AS", memory_mb << 20))
    return lims


def _read_paths() -> list[str]:
    """System folders the child may read; it adds its own Python installation and ``sys.path``
    (those of ``python -I``, not the parent's, which may hold the current folder)."""
    return ["/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/localtime",
            "/dev/urandom", "/dev/random", "/proc/self", "/sys/devices/system/cpu"]


def _report(status: dict) -> str:
    """Isolation string from the child's status; warns once per missing kernel layer."""
    missing = {k: v for k, v in status.get("missing", {}).items() if k in KERNEL_LAYERS}
    for layer, why in missing.items():
        if (layer, why) not in _WARNED and why != "turned off by the caller":
            _WARNED.add((layer, why))
            warnings.warn(f"sandbox: the {layer} layer is not active on this machine ({why}); "
                          f"model-written code then runs with weaker isolation (README: Security "
                          f"note); pass require='strict' to refuse such runs", RuntimeWarning,
                          stacklevel=3)
    return "+".join(status.get("layers", [])) or "none"


def run_python(code: str, *, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16,
               limit_processes: int | None = None, network_namespace: bool | None = None,
               require: str = "best-effort", layers_off: tuple = ()) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandboxed ``python -I``; never raises for bad code.

    ``timeout``: wall-clock seconds (CPU limit = ``int(timeout) + 2``); ``memory_mb``: address
    space limit (0 = none); ``file_mb``: largest file (stdout/stderr included);
    ``limit_processes``: RLIMIT_NPROC (None = task count + 64); ``network_namespace``: None =
    use it when available; ``require="strict"`` raises :class:`SandboxError` instead of running
    without Landlock and seccomp; ``layers_off``: kernel layers to skip (for tests/benchmarks).
    """
    if timeout <= 0:
        raise SandboxError(f"timeout must be positive, got {timeout}")
    if require not in REQUIRE:
        raise SandboxError(f"unknown require={require!r}; use one of {', '.join(REQUIRE)}")
    bad = set(layers_off) - {"rlimits", "nocaps", "landlock", "seccomp"}
    if bad:
        raise SandboxError(f"unknown layers_off {sorted(bad)}; use rlimits, nocaps, landlock, "
                           f"seccomp")
    if require == "strict":
        gaps = {k: v for k, v in kernel_layers().items() if v or k in layers_off}
        if gaps:
            raise SandboxError("require='strict' but the kernel layers are not all available: "
                               + "; ".join(f"{k}: {v or 'turned off'}" for k, v in gaps.items())
                               + "; run on Linux >= 5.13 with Landlock enabled and libseccomp2 "
                               "installed, or use require='best-effort'")
    use_ns = network_namespace_available() if network_namespace is None else network_namespace
    root = Path(tempfile.mkdtemp(prefix="skilllens-sandbox-"))
    work = root / "work"
    try:
        work.mkdir()
        (work / "solution.py").write_text(code, encoding="utf-8")
        cfg = {"limits": _limits(memory_mb, int(timeout) + 2, file_mb, limit_processes),
               "read": _read_paths(), "work": str(work), "strict": require == "strict",
               "skip": list(layers_off)}
        status_r, status_w = os.pipe()
        key_r, key_w = os.pipe()  # the completion nonce, read by the harness before user code
        done_r, done_w = os.pipe()  # the harness writes the nonce here after the program's end
        nonce = secrets.token_hex(16).encode()
        os.write(key_w, nonce)
        os.close(key_w)
        cfg.update(status_fd=status_w, key_fd=key_r, done_fd=done_w)
        cmd = [sys.executable, "-I", "-B", "-c", _CHILD_SOURCE, json.dumps(cfg)]
        if use_ns:
            cmd = [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--net"] + cmd
        env = {"HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        try:
            with open(root / "stdout.txt", "wb") as out, open(root / "stderr.txt", "wb") as err:
                try:
                    proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=err, env=env, close_fds=True,
                                            pass_fds=(status_w, key_r, done_w),
                                            start_new_session=True)
                except OSError as e:
                    raise SandboxError(f"cannot start the sandbox process ({e}); check that "
                                       f"{sys.executable} runs") from None
                finally:
                    for fd in (status_w, key_r, done_w):
                        os.close(fd)
                timed_out = False
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the whole group, also if it exited
                    except (ProcessLookupError, PermissionError):
                        pass
                    rc_final = proc.wait()
            raw = b"".join(iter(lambda: os.read(status_r, 1 << 16), b""))
            os.set_blocking(done_r, False)  # what arrived by now; never wait on it
            try:
                done = os.read(done_r, 256)
            except BlockingIOError:
                done = b""
        finally:
            for fd in (status_r, done_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
        duration = time.monotonic() - start
        try:
            status = json.loads(raw) if raw else {}
        except ValueError:
            status = {}
        if status.get("refused"):
            raise SandboxError("require='strict' but the child could not apply the kernel "
                               f"layers: {status.get('missing')}; use require='best-effort'")
        isolation = _report(status)
        if use_ns:
            isolation = isolation.replace("+audit-hook", "+netns+audit-hook")
        rc = None if timed_out else rc_final
        completed = secrets.compare_digest(done, nonce)
        return SandboxResult(passed=(not timed_out and rc == 0 and completed), returncode=rc,
                             timed_out=timed_out, stdout=_tail(root / "stdout.txt"),
                             stderr=_tail(root / "stderr.txt"), duration_s=round(duration, 3),
                             isolation=isolation, completed=completed)
    finally:
        shutil.rmtree(root, ignore_errors=True)


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
