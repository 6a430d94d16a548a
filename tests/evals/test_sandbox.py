from __future__ import annotations

import signal
import socket
import time

import pytest

from evals.sandbox import network_namespace_available, run_python


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


# Each layer on its own: the audit hook is turned off (audit=False), so only the
# layer under test stands between the program and what it tries to do.
_needs_netns = pytest.mark.skipif(
    not network_namespace_available(),
    reason="'unshare -rn' does not work here (no unshare binary, or unprivileged user namespaces are disabled): the sandbox runs without network isolation",
)


@_needs_netns
def test_network_namespace_alone_blocks_a_connection_to_the_host() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).close()\nprint('connected')\n"
    try:
        # Control: without the namespace (and without the hook) the host's listener is reachable.
        assert run_python(program, audit=False, isolate_network=False).passed
        r = run_python(program, audit=False)
        assert r.status == "failed" and "Network is unreachable" in r.detail, r.detail
    finally:
        server.close()


def test_file_size_limit_alone_stops_a_large_write() -> None:
    program = "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (3 * 1024 * 1024))\n"
    assert run_python(program, audit=False, file_mb=4).passed  # the limit, not the program, is what fails below
    r = run_python(program, audit=False, file_mb=1)
    assert r.status == "failed" and "File too large" in r.detail, r.detail


def test_cpu_limit_alone_kills_a_busy_loop() -> None:
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass\n", timeout=60, cpu_seconds=1, audit=False)
    # SIGXCPU after one CPU second, long before the 60 s wall-clock timeout.
    assert r.status == "timeout" and r.detail == "CPU time limit" and r.returncode == -signal.SIGXCPU
    assert time.perf_counter() - t0 < 30
