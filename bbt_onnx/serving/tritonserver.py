"""The tritonserver process: the binary PyTriton's wheel ships (2.51, python backend only), started directly on a
model repository, owned whole.

`TritonProcess` prepares a backend directory with the python backend's stub for this interpreter, starts
tritonserver in a session of its own (so its backend stubs are one process group), logs to a file, and waits until
every model has loaded (the server listens only then: readiness means the models are ready). `stop()` asks for a
clean exit, then kills the group and removes the stubs' shared memory. A `Watchdog` process, outside the group,
does the same for every group it was told of, and removes the workspace, when its owner's pipe closes: at a clean
exit, and when the owner dies without one (kill -9). No process, shared memory or folder outlives the owner.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ServerError, SettingsError

SHM_DIR = Path("/dev/shm")
READY_TIMEOUT = 300.0  # seconds for every model to load
LOG_TAIL = 64 << 10  # bytes of the log read back for a death's cause
ERROR_LINE = re.compile(r"^E\d{4} ")  # the log's error lines (E1207 10:00:00.000 ...); W and I lines are not errors
CRASH_MARKS = ("terminate called", "what():", "Signal (", "Aborted", "Segmentation fault", "core dumped")
STUB = "triton_python_backend_stub"  # a python-backend model's process (its command name is cut to 15 characters)


def group_members(pgid: int) -> dict[int, str]:
    """The living processes of a process group, by pid, with their command names (from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 1:].split()
        if int(rest[2]) == pgid and rest[0] not in ("Z", "X"):
            out[int(entry.name)] = name
    return out


def distribution() -> tuple[Path, Path]:
    """tritonserver's directory in the PyTriton wheel, and the folder of the libraries it was linked against."""
    try:
        import pytriton
    except ImportError:
        raise SettingsError("bbt-onnx serve needs the tritonserver PyTriton ships: pip install 'bbt-onnx[serve]'"
                            ) from None
    root = Path(pytriton.__file__).parent
    server, libs = root / "tritonserver", root.parent / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").is_file():
        raise SettingsError(f"{server} holds no tritonserver binary: reinstall nvidia-pytriton")
    return server, libs


def environment(libs: Path) -> dict[str, str]:
    """The stub loads libpython and the wheel's libraries from the library path, and runs the python of this
    environment (found on PATH), so the models import this environment's packages."""
    env = dict(os.environ)
    paths = [sysconfig.get_config_var("LIBDIR") or "", str(libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def backend_directory(server: Path, into: Path) -> Path:
    """`into`/backends with the python backend and the stub built for this interpreter's version."""
    stub = server / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
        "triton_python_backend_stub"
    if not stub.is_file():
        raise SettingsError(f"the tritonserver in {server} has no python backend stub for Python "
                            f"{sys.version_info[0]}.{sys.version_info[1]}")
    python = into / "backends" / "python"
    shutil.copytree(server / "backends" / "python", python, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(stub, python / "triton_python_backend_stub")
    return into / "backends"


@dataclass
class TritonProcess:
    """One tritonserver on loopback ports of its own, serving `repository`."""

    repository: Path
    workspace: Path
    http_port: int
    grpc_port: int
    token: str | None = None
    restricted: tuple[str, ...] = ()  # the APIs the token guards
    log_file: Path | None = None  # None: the log goes to this process's stderr
    exit_timeout: int = 5
    watchdog: "Watchdog | None" = None
    metrics: tuple[str, int] | None = None  # host and port for Prometheus metrics; None: off
    exit_on_error: bool = True  # False: a model that fails to load leaves the server up, not ready
    proc: subprocess.Popen | None = field(default=None, init=False)
    log_start: int = field(default=0, init=False)  # where this process's part of the log begins (once up: its life)
    backends: frozenset = field(default=frozenset(), init=False)  # the model backends' pids once every model loaded
    shm_prefix: str = field(default_factory=lambda: f"bbt-{uuid.uuid4().hex[:12]}-", init=False)

    def command(self, binary: Path, backends: Path) -> list[str]:
        cmd = [str(binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
               "--model-control-mode=none", "--strict-readiness=true", "--disable-auto-complete-config",
               f"--exit-on-error={str(self.exit_on_error).lower()}", f"--exit-timeout-secs={self.exit_timeout}",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}", "--log-verbose=0"]
        if self.metrics is None:
            cmd.append("--allow-metrics=false")
        else:
            cmd += [f"--metrics-address={self.metrics[0]}", f"--metrics-port={self.metrics[1]}"]
        if self.token and self.restricted:
            rule = f"{','.join(self.restricted)}:triton-access-token={self.token}"
            cmd += [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]
        return cmd

    def start(self, timeout: float = READY_TIMEOUT, ready=None) -> None:
        """Start it and return once every model has loaded (or `ready()` says so); a failed start is one ServerError
        with the log's last error."""
        server, libs = distribution()
        backends = self.workspace / "backends"
        if not backends.is_dir():
            backend_directory(server, self.workspace)
        # what tritonserver prints outside its log file (a crash's last words) goes to the same file
        out = open(self.log_file, "ab") if self.log_file else sys.stderr
        self.log_start = out.tell() if self.log_file else 0
        try:
            self.proc = subprocess.Popen(self.command(server / "bin" / "tritonserver", backends),
                                         env=environment(libs), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if self.log_file:
                out.close()
        if self.watchdog is not None:
            self.watchdog.guard(self.proc.pid, self.shm_prefix)
        deadline = time.monotonic() + timeout
        while not (ready or self.ready)():
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited ({self.exit_cause()}) while loading the models"
                                  f"{self.last_error()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"tritonserver did not load the models within {timeout:g} s{self.last_error()}")
            time.sleep(0.1)
        self.backends = self.backend_processes()
        if self.log_file is not None and self.log_file.is_file():  # a later death's cause: what came after the start
            self.log_start = self.log_file.stat().st_size

    def backend_processes(self) -> frozenset:
        """The python backend's processes in tritonserver's group (one per model instance)."""
        if self.proc is None:
            return frozenset()
        return frozenset(pid for pid, name in group_members(self.proc.pid).items() if STUB.startswith(name))

    def dead_backends(self) -> frozenset:
        """The model backends that ran once the models loaded and run no more. tritonserver stays up and ready
        when one is killed (by the out-of-memory killer, say), and answers every request of its model with a 500."""
        return self.backends - self.backend_processes()

    def ready(self) -> bool:
        """Listening, and (strict readiness) every model ready."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def last_error(self) -> str:
        """The last error this process wrote to the log (an E line, or a crash's last words), for a one-line
        message: read from the log's last 64 KiB, never from an earlier process's part nor, once it is up, from
        its start (whose E lines, such as a missing CUDA driver, are harmless), and never a warning that merely
        mentions an error."""
        if self.log_file is None or not self.log_file.is_file():
            return ""
        with open(self.log_file, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(self.log_start, end - LOG_TAIL))
            text = f.read(LOG_TAIL).decode(errors="replace")
        lines = [line for line in text.splitlines() if ERROR_LINE.match(line) or any(m in line for m in CRASH_MARKS)]
        return f": {' '.join(lines[-1].split())[:300]}" if lines else ""

    def exit_cause(self) -> str:
        """How the process ended: its exit code, or the signal that killed it (an abort is SIGABRT)."""
        code = None if self.proc is None else self.proc.poll()
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"code {code}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """A clean exit (SIGTERM, in-flight requests finish within the exit timeout), then the whole process group
        killed, the stubs' shared memory removed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.exit_timeout + 10)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc.pid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        remove_shared_memory(self.shm_prefix)


class Watchdog:
    """A process outside every tritonserver group that, when its owner's pipe closes (a clean exit, or the owner
    killed outright), kills each group it was told of, removes their shared memory, and removes the workspace."""

    SCRIPT = ("import glob, os, shutil, signal, sys\n"
              "groups = [line.split() for line in sys.stdin]\n"
              "for pgid, prefix in groups:\n"
              "    try:\n        os.killpg(int(pgid), signal.SIGKILL)\n    except OSError:\n        pass\n"
              "    for f in glob.glob('/dev/shm/' + prefix + '*'):\n"
              "        try:\n            os.unlink(f)\n        except OSError:\n            pass\n"
              "shutil.rmtree(sys.argv[1], ignore_errors=True)\n")

    def __init__(self, workspace: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(workspace)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     text=True)

    def guard(self, pgid: int, shm_prefix: str) -> None:
        self.proc.stdin.write(f"{pgid} {shm_prefix}\n")
        self.proc.stdin.flush()

    def close(self, timeout: float = 10.0) -> None:
        """Let it clean up now and wait for it."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def remove_shared_memory(prefix: str) -> None:
    for path in SHM_DIR.glob(prefix + "*"):
        path.unlink(missing_ok=True)
