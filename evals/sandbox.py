"""Run untrusted, model-written Python in a child process that cannot hang the
run, reach the network, or touch files outside its scratch directory.

Layers, outermost first:

1. ``unshare -rn`` (a new user and network namespace, so no interface but a
   downed loopback) when the kernel allows it; probed once.
2. Resource limits set in the child before exec: CPU seconds, address space,
   file size, no core dumps; a fresh session so the whole process group is
   killed at the wall-clock timeout.
3. An audit hook (PEP 578) installed before the program runs, which cannot be
   removed: it ends the process with exit code 3 on any socket use, process
   creation, ``ctypes``, writes outside the scratch directory, or reads outside
   it and the Python installation.
4. ``python -I``: no user site, no PYTHON* variables, a minimal environment,
   and the scratch directory as working directory.

A violation, a crash, a timeout or a failed assertion are all scored failures
(``ExecResult.passed`` is False) with a status saying which.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

VIOLATION_EXIT = 3

# Runs in the child as `python -I -c GUARD program.py scratch_dir audit|no-audit`.
GUARD = r'''
import os, sys
_SCRATCH = os.path.realpath(sys.argv[2])
_READ = tuple(sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(os.__file__))}))
_BLOCK_PREFIX = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg", "os.system", "os.startfile", "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.", "telnetlib.", "imaplib.", "poplib.", "nntplib.")
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.symlink", "os.link", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.chdir"}
_BLOCK_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "socket", "_socket", "ssl", "_ssl"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _die(what):
    try:
        os.write(2, ("\nSandboxViolation: " + what + "\n").encode("utf-8", "replace"))
    finally:
        os._exit(3)

def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False, str(path)
    return p == _SCRATCH or p.startswith(_SCRATCH + os.sep), p

def _hook(event, args):
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        if path is None or isinstance(path, int):
            return
        inside, p = _inside(path)
        if inside:
            return
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writes:
            _die("write outside the scratch directory: " + p)
        if not any(p == r or p.startswith(r + os.sep) for r in _READ):
            _die("read outside the scratch directory: " + p)
    elif event == "import":
        if args and str(args[0]).split(".")[0] in _BLOCK_IMPORTS:
            _die("import of " + str(args[0]))
    elif event.startswith(_BLOCK_PREFIX):
        _die(event)
    elif event in _PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a)[0]:
                _die(event + " outside the scratch directory: " + os.fsdecode(a))

if sys.argv[3] == "audit":
    sys.addaudithook(_hook)
_path = os.path.join(_SCRATCH, sys.argv[1])
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
del _f
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class ExecResult:
    """How a sandboxed program ended: ``status`` is ``passed``, ``failed`` (an
    exception or non-zero exit), ``timeout`` or ``blocked`` (a sandbox violation)."""

    status: str
    detail: str
    seconds: float
    returncode: int | None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether ``unshare -rn`` works here (unprivileged user namespaces)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _limits(cpu: int, memory_mb: int, file_mb: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    fsize = file_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(
    program: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    file_mb: int = 16,
    isolate_network: bool = True,
    cpu_seconds: int | None = None,
    audit: bool = True,
) -> ExecResult:
    """Run ``program`` (Python source) in the sandbox; never raises for anything the program does.

    ``timeout`` is wall-clock seconds; ``cpu_seconds`` (default ``timeout`` + 1)
    the CPU-time limit; ``memory_mb`` the address space; ``file_mb`` the largest
    file the program may write. ``isolate_network`` and ``audit`` turn layers 1
    and 3 off, which only the tests do (to show each remaining layer holds on its own).
    """
    cpu = int(timeout) + 1 if cpu_seconds is None else int(cpu_seconds)
    if cpu < 1:
        raise ValueError(f"cpu_seconds: expected a positive integer, found {cpu_seconds!r}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="collab-sandbox-") as scratch:
        with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        cmd = [sys.executable, "-I", "-c", GUARD, "program.py", scratch, "audit" if audit else "no-audit"]
        if isolate_network and network_namespace_available():
            cmd = [shutil.which("unshare") or "unshare", "-rn"] + cmd
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch, "PYTHONHASHSEED": "0"}
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=scratch,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=lambda: _limits(cpu, memory_mb, file_mb),
            )
        except OSError as e:
            return ExecResult("failed", f"could not start the sandbox: {e}", time.perf_counter() - t0, None)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ExecResult("timeout", f"still running after {timeout:g} s", time.perf_counter() - t0, None)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
        seconds = time.perf_counter() - t0
    text = err.decode("utf-8", "replace").strip()
    last = text.splitlines()[-1] if text else ""
    rc = proc.returncode
    if rc == 0:
        return ExecResult("passed", "", seconds, rc)
    if rc == VIOLATION_EXIT and "SandboxViolation:" in text:
        return ExecResult("blocked", last.replace("SandboxViolation: ", ""), seconds, rc)
    if rc is not None and rc < 0:
        sig = -rc
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        what = "CPU time limit" if sig == signal.SIGXCPU else f"killed by {name}"
        return ExecResult("timeout" if sig == signal.SIGXCPU else "failed", what, seconds, rc)
    return ExecResult("failed", last[-300:] or f"exit code {rc}", seconds, rc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
