from __future__ import annotations

import time

from evals.sandbox import run_python


def test_correct_program_passes() -> None:
    r = run_python("def f(x):\n    return x * 2\nassert f(3) == 6\n")
    assert r.passed and r.status == "passed"


def test_wrong_program_fails_with_reason() -> None:
    r = run_python("def f(x):\n    return x + 2\nassert f(3) == 6\n")
    assert r.status == "failed" and "AssertionError" in r.detail


def test_infinite_loop_times_out() -> None:
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass\n", timeout=1.5)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 15


def test_network_attempt_is_blocked() -> None:
    r = run_python("import socket\ns = socket.create_connection(('93.184.216.34', 80), timeout=2)\n")
    assert r.status == "blocked" and "socket" in r.detail
    r = run_python("try:\n    import urllib.request\n    urllib.request.urlopen('http://example.com', timeout=2)\nexcept Exception:\n    pass\n")
    assert r.status == "blocked"  # catching the error does not help: the process ends


def test_files_outside_scratch_are_blocked(tmp_path) -> None:  # noqa: ANN001
    target = tmp_path / "evil.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')\n")
    assert r.status == "blocked" and not target.exists()
    r = run_python("print(open('/etc/hostname').read())\n")
    assert r.status == "blocked"
    r = run_python("import os\nos.system('true')\n")
    assert r.status == "blocked"
    # The scratch directory itself is usable.
    assert run_python("open('a.txt', 'w').write('hi')\nassert open('a.txt').read() == 'hi'\n").passed


def test_memory_limit() -> None:
    r = run_python("x = bytearray(3 * 1024 ** 3)\n", memory_mb=512)
    assert r.status == "failed" and "MemoryError" in r.detail
