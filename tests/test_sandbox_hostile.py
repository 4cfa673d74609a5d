"""Hostile programs, each run after switching off the sandbox's audit hook (the escape that beat
the old sandbox), must be contained by the kernel layers: checked from outside the sandbox."""
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from skilllens.sandbox import kernel_layers, run_python

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel layers need Linux"),
    pytest.mark.skipif(sys.platform.startswith("linux") and any(kernel_layers().values()),
                       reason=f"kernel layers unavailable here: {kernel_layers()}"),
]
T = 4.0

# Overwrites the tuple that the audit hook's closure checks, found through gc: the hook then
# allows everything. Prints how many hooks it disarmed.
ESCAPE = '''
import gc
def _disarm():
    n = 0
    for o in gc.get_objects():
        if type(o).__name__ == "function" and o.__closure__:
            for cell in o.__closure__:
                try:
                    v = cell.cell_contents
                except ValueError:
                    continue
                if isinstance(v, tuple) and "socket." in v:
                    cell.cell_contents = ("never-an-event",)
                    n += 1
    return n
print("disarmed", _disarm(), flush=True)
import ctypes  # refused by the audit hook unless it is disarmed
'''


def hostile(code: str, timeout: float = T, check_disarmed: bool = True, **kw):
    """Run ESCAPE + code with only the kernel layers (no network namespace) to hold it."""
    kw.setdefault("network_namespace", False)
    res = run_python(ESCAPE + code, timeout=timeout, require="strict", **kw)
    if check_disarmed:  # the audit layer really was switched off
        assert res.stdout.startswith("disarmed 1\n"), res
    assert "landlock" in res.isolation and "seccomp" in res.isolation
    return res


def test_escape_disarms_the_audit_hook_but_not_the_kernel():
    res = hostile("print('ctypes loaded', ctypes.CDLL(None) is not None)")
    assert res.passed and "ctypes loaded True" in res.stdout


def test_fork_after_escape_is_refused_by_the_kernel():
    res = hostile("import os\npid = os.fork()\nif pid == 0:\n    print('CHILD', flush=True)\n"
                  "    os._exit(0)\nprint('forked', pid)")
    assert "CHILD" not in res.stdout and "forked" not in res.stdout
    assert "PermissionError: [Errno 1]" in res.stderr


def test_exec_and_subprocess_after_escape_are_refused(tmp_path):
    marker = tmp_path / "shell-ran"
    res = hostile(f"import os\nos.execv('/bin/sh', ['sh', '-c', 'echo SHELL; touch {marker}'])")
    assert "SHELL" not in res.stdout and "PermissionError" in res.stderr
    res = hostile(f"import subprocess\nsubprocess.run(['/bin/touch', '{marker}'])")
    assert "PermissionError" in res.stderr
    res = hostile(f"import os\nprint('status', os.system('touch {marker}'))")
    assert not marker.exists()


def test_ctypes_libc_fork_and_raw_clone_are_refused():
    code = ("import os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "r = []\nfor _ in range(20):\n    r.append(libc.fork())\n"
            "    if r[-1] == 0:\n        print('CHILD', flush=True)\n        os._exit(0)\n"
            "print('fork', sorted(set(r)), ctypes.get_errno())\n"
            "libc.syscall.restype = ctypes.c_long\n"
            "print('vfork', libc.syscall(58), ctypes.get_errno())\n"
            "print('clone', libc.syscall(56, 17, 0, 0, 0, 0), ctypes.get_errno())\n"
            "print('clone3', libc.syscall(435, 0, 0), ctypes.get_errno())\n"
            "print('io_uring', libc.syscall(425, 8, 0), ctypes.get_errno())\n")
    res = hostile(code)
    assert res.passed, res
    assert "CHILD" not in res.stdout
    lines = res.stdout.splitlines()
    assert "fork [-1] 1" in lines  # every fork failed with EPERM
    assert "vfork -1 1" in lines and "clone -1 1" in lines and "io_uring -1 1" in lines
    assert "clone3 -1 38" in lines  # ENOSYS: libc falls back to clone, which is checked


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 machine code")
def test_foreign_syscall_abi_kills_the_process():
    # int 0x80 runs the i386 table (fork = 2), which a naive x86-64 filter would not see
    code = ("import mmap\nm = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | "
            "mmap.PROT_EXEC)\nm.write(bytes([0xb8, 2, 0, 0, 0, 0xcd, 0x80, 0xc3]))\n"
            "addr = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
            "r = ctypes.CFUNCTYPE(ctypes.c_int)(addr)()\nprint('int80 fork', r, flush=True)\n")
    res = hostile(code)
    assert "int80 fork" not in res.stdout
    assert res.returncode in (-signal.SIGSYS, -signal.SIGSEGV), res


def test_fork_bomb_is_contained():
    res = hostile("import os\nwhile True:\n    os.fork()")
    assert not res.passed and "PermissionError" in res.stderr and res.duration_s < T
    res = hostile("import os\nlibc = ctypes.CDLL(None)\nn = 0\nfor _ in range(5000):\n"
                  "    n += libc.fork() >= 0\nprint('forks that worked', n)")
    assert "forks that worked 0" in res.stdout


def test_memory_bomb_is_stopped():
    res = hostile("x = []\nwhile True:\n    x.append(bytearray(64 << 20))", memory_mb=384)
    assert not res.passed and "MemoryError" in res.stderr and not res.timed_out


def test_infinite_loop_is_killed():
    t = time.monotonic()
    res = hostile("while True:\n    pass", timeout=2)
    assert res.timed_out and res.returncode is None and time.monotonic() - t < 5


def test_network_after_escape_is_refused_and_nothing_arrives(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    unix = socket.socket(socket.AF_UNIX)
    unix_path = str(tmp_path / "s.sock")
    unix.bind(unix_path)
    unix.listen(1)
    unix.setblocking(False)
    try:
        code = ("import socket\nfor fam, addr in ((socket.AF_INET, ('127.0.0.1', %d)), "
                "(socket.AF_UNIX, %r), (socket.AF_INET6, ('::1', %d))):\n"
                "    try:\n        s = socket.socket(fam)\n        s.connect(addr)\n"
                "        print('connected', fam)\n"
                "    except OSError as e:\n        print('refused', type(e).__name__, e.errno)\n"
                "try:\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
                "('127.0.0.1', %d))\n    print('sent')\n"
                "except OSError as e:\n    print('refused', type(e).__name__, e.errno)\n"
                % (port, unix_path, port, port))
        res = hostile(code)
        assert res.passed and "connected" not in res.stdout and "sent" not in res.stdout
        assert res.stdout.count("refused PermissionError 1") == 4
        for s in (server, unix):
            with pytest.raises(BlockingIOError):
                s.accept()  # no connection ever reached the listeners
    finally:
        server.close()
        unix.close()


def test_writes_outside_the_run_folder_are_refused(tmp_path):
    targets = [tmp_path / "outside.txt", f"/tmp/skilllens-escape-{uuid.uuid4().hex}",
               os.path.expanduser("~/skilllens-escape-marker")]
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    victim.chmod(0o644)
    code = "import os\n"
    for t in targets:
        code += f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError as e:\n    " \
                f"print('refused', e.errno)\n"
    code += (f"for f in (lambda: os.chmod({str(victim)!r}, 0o777), "
             f"lambda: open({str(victim)!r}, 'a').write('tampered'), "
             f"lambda: os.truncate({str(victim)!r}, 0), lambda: os.unlink({str(victim)!r}), "
             f"lambda: os.symlink('/etc', {str(tmp_path / 'link')!r})):\n"
             "    try:\n        f()\n        print('done')\n"
             "    except OSError as e:\n        print('refused', e.errno)\n"
             "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n")
    res = hostile(code)
    assert res.passed, res
    assert "done" not in res.stdout and res.stdout.count("refused") == 8
    assert res.stdout.rstrip().endswith("ok")  # the run's own folder stays writable
    for t in targets:
        assert not os.path.exists(t), t
    assert victim.read_text() == "original" and (victim.stat().st_mode & 0o777) == 0o644
    assert not (tmp_path / "link").exists()


def test_parent_environment_and_secrets_stay_hidden(monkeypatch):
    secret = f"skilllens-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("SKILLLENS_TEST_SECRET", secret)
    paths = [f"/proc/{os.getpid()}/environ", f"/proc/{os.getpid()}/cmdline", "/proc/1/environ",
             os.path.expanduser("~/.bashrc"), "/etc/shadow", "/etc/passwd"]
    paths = [p for p in paths if os.path.exists(p)]
    code = ("import os\nprint(sorted(os.environ))\n"
            f"for p in {paths!r}:\n"
            "    try:\n        print(open(p, 'rb').read()[:4000])\n"
            "    except OSError as e:\n        print('refused', e.errno)\n")
    res = hostile(code)
    assert secret not in res.stdout + res.stderr
    assert "SKILLLENS_TEST_SECRET" not in res.stdout
    assert res.stdout.count("refused 13") == len(paths)  # EACCES from Landlock for each


def test_no_process_outlives_the_run():
    code = ("import os, threading, time\nprint('pid', os.getpid(), os.getcwd(), flush=True)\n"
            "libc = ctypes.CDLL(None)\n"
            "for f in (os.fork, libc.fork, lambda: os.posix_spawn('/bin/sleep', ['sleep', '60'], "
            "{})):\n    try:\n        r = f()\n        if r == 0:\n            os.setsid()\n"
            "            time.sleep(60)\n            os._exit(0)\n"
            "        print('result', r, flush=True)\n"
            "    except OSError as e:\n        print('refused', e.errno, flush=True)\n"
            "threading.Thread(target=time.sleep, args=(60,), daemon=False).start()\n"
            "time.sleep(60)\n")
    res = hostile(code, timeout=2)
    assert res.timed_out
    pid, cwd = res.stdout.split("pid ")[1].split()[:2]
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped
    assert res.stdout.count("refused 1") == 2 and "result -1" in res.stdout  # libc.fork: -1
    leftovers = []
    for p in os.listdir("/proc"):
        try:
            if os.readlink(f"/proc/{p}/cwd").startswith(cwd):  # this run's folder
                leftovers.append(p)
        except OSError:
            pass
    assert not leftovers


def test_signals_to_other_processes_are_refused():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # SIGKILL to a bystander, signal 0 (existence probe) to the test process itself
        res = hostile(f"import os, signal\nfor pid, sig in (({victim.pid}, signal.SIGKILL), "
                      f"({os.getpid()}, 0)):\n"
                      "    try:\n        os.kill(pid, sig)\n        print('killed')\n"
                      "    except OSError as e:\n        print('refused', e.errno)\n")
        time.sleep(0.2)
        assert victim.poll() is None  # still running
        assert "killed" not in res.stdout and res.stdout.count("refused 1") == 2
    finally:
        victim.kill()
        victim.wait()


def test_limits_cannot_be_raised_after_escape():
    code = ("import resource\nfor r in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, "
            "resource.RLIMIT_CPU):\n    soft, hard = resource.getrlimit(r)\n"
            "    for f in (resource.setrlimit, lambda r, v: resource.prlimit(0, r, v)):\n"
            "        try:\n            f(r, (soft, hard))\n            print('set')\n"
            "        except (OSError, ValueError) as e:\n            print('refused')\n"
            "print(resource.getrlimit(resource.RLIMIT_AS)[1] >> 20)\n")
    res = hostile(code, memory_mb=600)
    assert res.passed and "set" not in res.stdout.split() and res.stdout.count("refused") == 6
    assert res.stdout.split()[-1] == "600"


def test_closing_or_redirecting_output_is_harmless():
    # closes both outputs, then tries to write the parent's output files through their paths
    code = ("import os, time\nos.close(1)\nos.close(2)\n"
            "for p in ('../stdout.txt', '/proc/self/fd/1', '/dev/stdout'):\n"
            "    try:\n        open(p, 'w').write('FORGED')\n    except OSError:\n        pass\n"
            "time.sleep(60)\n")
    res = hostile(code, timeout=2)
    assert res.timed_out and "FORGED" not in res.stdout + res.stderr
    res = hostile("import os\nfd = os.open('elsewhere.txt', os.O_WRONLY | os.O_CREAT)\n"
                  "os.dup2(fd, 1)\nos.dup2(fd, 2)\nprint('hidden')\n")
    assert res.passed and res.stdout == "disarmed 1\n" and res.stderr == ""


def test_stdout_flood_is_bounded():
    t = time.monotonic()
    res = hostile("import sys\nchunk = b'x' * (1 << 20)\n"
                  "for _ in range(100):\n    sys.stdout.buffer.write(chunk)\n", file_mb=16,
                  check_disarmed=False)
    assert not res.passed and "File too large" in res.stderr
    assert len(res.stdout) <= 2000 and time.monotonic() - t < T + 2


# --- pass@1: "passed" means the checks ran to the end (issue 21 item 4) -----------------------
# Each trick follows a wrong solution (``a - b``) at module level, so it runs before ``check``.
EARLY_EXITS = {
    "raise SystemExit": "raise SystemExit\n",
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "exit()": "exit()\n",
    "quit()": "quit()\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "SIGKILL self": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "SIGTERM self": "import signal\nsignal.raise_signal(signal.SIGTERM)\n",
    "close outputs, exit 0": "import os\nos.close(1)\nos.close(2)\nos._exit(0)\n",
    "fake marker on stdout": ("import os\nfor m in ('passed', 'OK', 'done', '0' * 32):\n"
                              "    print(m, flush=True)\nos._exit(0)\n"),
    "patched print/stdout/os.write": (
        "import builtins, io, os, sys\nbuiltins.print = lambda *a, **k: None\n"
        "sys.stdout = sys.stderr = io.StringIO()\nos.write = lambda fd, b: len(b)\n"
        "os._exit = lambda code: None\nraise SystemExit(0)\n"),
    "write junk to every fd": (
        "import os\nfor fd in range(3, 256):\n    try:\n        os.set_blocking(fd, False)\n"
        "        got = os.read(fd, 256)\n    except OSError:\n        got = b''\n"
        "    try:\n        os.write(fd, got or b'0' * 32)\n    except OSError:\n        pass\n"
        "os._exit(0)\n"),
    "atexit os._exit(0)": "import atexit, os\natexit.register(os._exit, 0)\nraise SystemExit(1)\n",
    "thread exits the process": (
        "import os, threading\nthreading.Thread(target=os._exit, args=(0,)).start()\n"
        "import time\ntime.sleep(5)\n"),
}
ADD_PROMPT = "def add(a, b):\n"
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


@pytest.mark.parametrize("trick", sorted(EARLY_EXITS))
def test_exiting_before_the_checks_is_not_a_pass(trick):
    from skilllens.sandbox import humaneval_program, mbpp_program

    programs = [humaneval_program(ADD_PROMPT, "    return a - b\n" + EARLY_EXITS[trick],
                                  ADD_TEST, "add"),
                mbpp_program("def add(a, b):\n    return a - b\n" + EARLY_EXITS[trick],
                             ["assert add(2, 3) == 5"])]
    for program in programs:
        res = run_python(program, timeout=T, require="strict", network_namespace=False)
        assert not res.passed and not res.completed, (trick, res)
    # the same trick after a correct solution whose checks all ran is still a pass
    res = run_python(humaneval_program(ADD_PROMPT, "    return a + b\n", ADD_TEST, "add")
                     + "\nprint('checks done')\n", timeout=T)
    assert res.passed and res.completed and res.stdout.endswith("checks done\n")


def test_completion_cannot_read_the_nonce_from_files_argv_or_environment():
    # the nonce is 32 hex digits; no place the program can read holds such a run
    code = ("import os, re, sys, json\n"
            "seen = [open('solution.py').read(), ' '.join(sys.argv), json.dumps(dict(os.environ)),\n"
            "        open('/proc/self/cmdline', 'rb').read().decode('utf-8', 'replace')]\n"
            "print([len(re.findall(r'[0-9a-f]{32}', s)) for s in seen], 'key_fd' in seen[3])\n")
    res = run_python(code, timeout=T)
    assert res.passed and res.stdout.strip() == "[0, 0, 0, 0] True", res
