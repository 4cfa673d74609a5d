"""The sandbox stops misbehaving code quickly and cleanly, and passes correct code."""
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from skilllens.sandbox import runner as sandbox
from skilllens.data import Item, load_skill
from skilllens.errors import DataError
from skilllens.sandbox import (SandboxError, check_item, humaneval_program, kernel_layers,
                               mbpp_program, network_namespace_available, run_python)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX")
T = 4.0  # seconds; generous for a loaded shared CPU


def _fails_fast(code, limit=T + 6, **kw):
    t = time.monotonic()
    res = run_python(code, timeout=T, **kw)
    took = time.monotonic() - t
    assert not res.passed, res
    assert took < limit, f"took {took:.1f}s"
    return res


def test_correct_code_passes_and_output_is_captured():
    res = run_python("import sys\nprint('hello')\nprint('warn', file=sys.stderr)", timeout=T)
    assert res.passed and res.returncode == 0 and not res.timed_out
    assert res.stdout == "hello\n" and res.stderr == "warn\n" and res.reason == "passed"


def test_failing_assertion_fails():
    res = _fails_fast("assert 1 + 1 == 3")
    assert res.returncode == 1 and "AssertionError" in res.stderr


def test_infinite_loop_is_killed_by_wall_clock():
    res = _fails_fast("while True:\n    pass")
    assert res.timed_out and res.returncode is None and res.reason == "timed out"


def test_sleeping_child_group_is_killed():
    res = _fails_fast("import time\ntime.sleep(60)")
    assert res.timed_out


def test_unbounded_memory_is_stopped():
    res = _fails_fast("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))", memory_mb=512)
    assert res.timed_out or "MemoryError" in res.stderr or res.returncode < 0


def test_fork_and_subprocess_are_refused():
    res = _fails_fast("import os\npid = os.fork()\nprint('forked', pid)")
    assert "forked" not in res.stdout and "os.fork" in res.stderr
    res = _fails_fast("import subprocess\nsubprocess.run(['true'])")
    assert "not allowed" in res.stderr
    res = _fails_fast("import os\nos.system('echo escaped')")
    assert "escaped" not in res.stdout


@pytest.mark.parametrize("host", ["127.0.0.1", "example.com"])
def test_network_is_refused(host):
    code = (f"import socket\ns = socket.create_connection(({host!r}, 80), timeout=2)\n"
            f"print('connected')")
    res = _fails_fast(code)
    assert "connected" not in res.stdout and "not allowed" in res.stderr


def test_network_namespace_alone_blocks_loopback():
    if not network_namespace_available():
        pytest.skip("unprivileged network namespaces are not available here")
    code = ("rows = open('/proc/self/net/dev').read().splitlines()[2:]\n"
            "print(sorted(r.split(':')[0].strip() for r in rows))")
    inside = run_python(code, timeout=T)
    assert inside.passed and inside.isolation.endswith("+netns+audit-hook")
    assert inside.stdout.strip() == "['lo']"  # an empty namespace: only a loopback, no uplink
    outside = run_python(code, timeout=T, network_namespace=False, layers_off=("landlock",))
    assert outside.passed and "netns" not in outside.isolation
    assert outside.stdout.strip() != "['lo']"  # the host's interfaces


def test_limits_are_set_and_cannot_be_raised():
    code = ("import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20, "
            "resource.getrlimit(resource.RLIMIT_CORE))\n"
            "resource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    res = _fails_fast(code, memory_mb=700)
    assert res.stdout.split() == ["700", "(0,", "0)"] and "not allowed" in res.stderr


def test_files_go_to_a_fresh_temp_dir_that_is_removed():
    res = run_python("import os\nopen('out.txt', 'w').write('x')\nprint(os.getcwd())", timeout=T)
    assert res.passed
    cwd = res.stdout.strip()
    assert "skilllens-sandbox-" in cwd and not os.path.exists(cwd)


def test_endless_output_is_bounded():
    res = _fails_fast("while True:\n    print('x' * 4096)", file_mb=1)
    assert len(res.stdout) <= 2000


def test_bad_timeout_is_an_error():
    with pytest.raises(SandboxError, match="timeout"):
        run_python("pass", timeout=0)


def test_humaneval_canonical_solution_passes_and_wrong_one_fails(data_dir):
    items = {it.id: it for it in load_skill("humaneval", data_dir, "all")}
    for tid in ("HumanEval/0", "HumanEval/2", "HumanEval/53"):
        it = items[tid]
        assert check_item(it, it.answer, timeout=10).passed, tid
    it = items["HumanEval/0"]
    assert not check_item(it, "    return True\n", timeout=10).passed
    prog = humaneval_program(it.prompt, it.answer, it.meta["test"], it.meta["entry_point"])
    assert prog.rstrip().endswith("check(has_close_elements)")


def test_mbpp_program_runs_asserts():
    it = Item("mbpp/1", "p", "", {"test_list": ["assert add(1, 2) == 3"], "test_setup_code": ""})
    assert check_item(it, "def add(a, b):\n    return a + b", timeout=T).passed
    assert not check_item(it, "def add(a, b):\n    return a - b", timeout=T).passed
    assert mbpp_program("x = 1", ["assert x == 1"]).strip().endswith("assert x == 1")


def test_item_without_tests_is_a_clear_error():
    with pytest.raises(SandboxError, match="pass@1 needs"):
        check_item(Item("a", "p", "q"), "pass")


KERNEL = sys.platform.startswith("linux") and not any(kernel_layers().values())
needs_kernel = pytest.mark.skipif(not KERNEL, reason=f"kernel layers unavailable: "
                                                     f"{kernel_layers()}")


@needs_kernel
def test_isolation_reports_the_layers_that_held():
    res = run_python("pass", timeout=T, network_namespace=False, require="strict")
    want = ["rlimits", "nocaps", "landlock", "seccomp", "audit-hook"]
    if os.geteuid() != 0:
        want.remove("nocaps")
    assert res.passed and res.isolation.split("+") == want
    res = run_python("pass", timeout=T, network_namespace=False, layers_off=("seccomp",))
    assert res.passed and "seccomp" not in res.isolation and "landlock" in res.isolation


def test_environment_cwd_home_are_fresh_and_empty(monkeypatch):
    monkeypatch.setenv("SKILLLENS_PARENT_ONLY", "leak")
    res = run_python("import os, sys\nprint(sorted(os.environ))\nprint(os.getcwd())\n"
                     "print(os.environ['HOME'], os.environ['TMPDIR'])\nprint(sys.stdin.read())",
                     timeout=T)
    assert res.passed, res
    names, cwd, homes, stdin = res.stdout.split("\n")[:4]
    assert "SKILLLENS_PARENT_ONLY" not in names and "PATH" not in names
    assert homes.split() == [cwd, cwd] and "skilllens-sandbox-" in cwd and stdin == ""
    assert not os.path.exists(os.path.dirname(cwd))  # the whole run folder is gone


@needs_kernel
def test_without_kernel_layers_the_audit_escape_works(tmp_path):
    """The hostile battery can fail: with Landlock and seccomp off, the escape writes outside."""
    from test_sandbox_hostile import ESCAPE
    target = tmp_path / "escaped.txt"
    code = ESCAPE + f"open({str(target)!r}, 'w').write('x')\n"
    res = run_python(code, timeout=T, network_namespace=False, layers_off=("landlock", "seccomp"))
    assert res.passed and target.exists()
    target.unlink()
    res = run_python(code, timeout=T, network_namespace=False)
    assert not res.passed and not target.exists()


def test_strict_refuses_without_kernel_layers(monkeypatch):
    monkeypatch.setattr(sandbox, "kernel_layers",
                        lambda: {"landlock": "Landlock is not enabled in this kernel",
                                 "seccomp": ""})
    with pytest.raises(SandboxError, match="require='strict'.*landlock.*best-effort"):
        run_python("print('ran')", timeout=T, require="strict")
    with pytest.raises(SandboxError, match="unknown require"):
        run_python("pass", require="paranoid")
    with pytest.raises(SandboxError, match="unknown layers_off"):
        run_python("pass", layers_off=("audit-hook",))


def test_missing_layer_warns_once(monkeypatch):
    monkeypatch.setattr(sandbox, "_WARNED", set())
    status = {"layers": ["rlimits", "landlock", "audit-hook"],
              "missing": {"seccomp": "OSError: libseccomp.so.2: cannot open"}}
    with pytest.warns(RuntimeWarning, match="seccomp layer is not active"):
        assert sandbox._report(status) == "rlimits+landlock+audit-hook"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sandbox._report(status)  # the second time: silent


def _humaneval():
    try:
        return load_skill("humaneval", part="all")
    except DataError as e:
        pytest.skip(f"HumanEval data not found: {e}")


def test_all_humaneval_canonical_solutions_pass():
    items = list(_humaneval())
    assert len(items) == 164

    def run(it):
        return it.id, check_item(it, it.answer, timeout=30, network_namespace=False)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, items))
    failed = {k: r.reason for k, r in results.items() if not r.passed}
    assert not failed, failed
    if KERNEL:
        assert all("seccomp" in r.isolation and "landlock" in r.isolation
                   for r in results.values())


def test_honest_programs_using_threads_files_and_libraries_pass():
    code = ("import hashlib, json, os, tempfile, threading, time, random, datetime, decimal\n"
            "from concurrent.futures import ThreadPoolExecutor\n"
            "with ThreadPoolExecutor(4) as pool:\n"
            "    assert list(pool.map(lambda x: x * x, range(8)))[-1] == 49\n"
            "t = threading.Thread(target=time.sleep, args=(0.01,)); t.start(); t.join()\n"
            "with tempfile.TemporaryDirectory() as d:\n"
            "    open(os.path.join(d, 'a.json'), 'w').write(json.dumps([1]))\n"
            "os.makedirs('sub/dir'); os.rename('solution.py', 'sub/dir/s.py')\n"
            "print(hashlib.md5(b'x').hexdigest()[:6], time.localtime().tm_year > 2000,\n"
            "      os.cpu_count() >= 1, random.Random(0).random() < 1)\n"
            "import numpy\nprint(int(numpy.arange(10).sum()))\n")
    res = run_python(code, timeout=20)
    assert res.passed, res
    assert res.stdout.split() == ["9dd4e4", "True", "True", "True", "45"]


def test_the_child_cannot_read_the_parents_working_folder(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("private")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m` run from that folder would
    res = run_python(f"print(open({str(tmp_path / 'notes.txt')!r}).read())", timeout=T)
    if KERNEL:
        assert not res.passed and "private" not in res.stdout and "Permission" in res.stderr
