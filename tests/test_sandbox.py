"""The sandbox stops misbehaving code quickly and cleanly, and passes correct code."""
import os
import time

import pytest

from skilllens.data import Item, load_skill
from skilllens.sandbox import (SandboxError, check_item, humaneval_program, mbpp_program,
                               network_namespace_available, run_python)

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
    assert inside.passed and inside.isolation == "netns+audit-hook"
    assert inside.stdout.strip() == "['lo']"  # an empty namespace: only a loopback, no uplink
    outside = run_python(code, timeout=T, network_namespace=False)
    assert outside.passed and outside.isolation == "audit-hook"


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
