"""Where a run was made: versions, the processor, the command line. The same seed gives the same z only within one
environment (numpy releases round A z differently; BLAS and onnxruntime builds sum in different orders), so a
report compares runs only with their environments in view."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata

VERSIONED = ("bbt-onnx", "numpy", "onnxruntime", "onnxruntime-gpu", "cma", "tritonclient")
SECRET_FLAG = re.compile(r"^--?([\w-]*-)?(token|secret|password|passwd|api-key)(-file)?$", re.IGNORECASE)
USERINFO = re.compile(r"([A-Za-z][\w+.-]*://)[^/?#\s]*@")  # scheme://user:password@host: the part before the host
# a secret-looking query parameter's value (a database URI's ?password=...)
SECRET_PARAM = re.compile(r"([?&;](?:password|passwd|pwd|pass|secret|token|access_token|api_?key|sslpassword|"
                          r"client_secret)=)[^&;#\s]*", re.IGNORECASE)
HIDDEN = "***"


def hide_credentials(text: str) -> str:
    """`text` with every URL's userinfo and every secret-looking query parameter's value hidden."""
    return SECRET_PARAM.sub(r"\1" + HIDDEN, USERINFO.sub(r"\1" + HIDDEN + "@", text))


def versions() -> dict[str, str]:
    """The packages that decide a run's numbers, those installed, and python's own."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["blas"] = blas()
    return found


def blas() -> str:
    """numpy's BLAS as its build recorded it, e.g. `openblas64 0.3.23.dev`."""
    try:
        import numpy as np

        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{info.get('name', '?')} {info.get('version', '?')}".strip()
    except Exception:  # noqa: BLE001 - numpy's build description varies by release; absent is fine
        return "unknown"


def processor() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else the platform's word for it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[str]:
    """The GPUs nvidia-smi lists (none without it)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        out = subprocess.run([tool, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def command_line(argv: list[str] | None = None) -> list[str]:
    """The command as typed, with the values of secret-looking flags and any credentials in URLs hidden."""
    argv = list(sys.argv if argv is None else argv)
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(HIDDEN)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        secret = bool(SECRET_FLAG.match(flag)) and not flag.endswith("-file")
        if secret and eq:
            out.append(f"{flag}={HIDDEN}")
            continue
        hide_next = secret
        out.append(hide_credentials(arg))
    return out


def provenance(provider: str, argv: list[str] | None = None) -> dict:
    """run.json's record of where the run was made."""
    record = {"versions": versions(), "cpu": processor(), "platform": platform.platform(),
              "provider": provider, "command": command_line(argv)}
    if provider.startswith(("CUDA", "Tensorrt")):
        record["gpus"] = gpus()
    return record
