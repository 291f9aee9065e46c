"""The runtime serves and tunes with onnxruntime, numpy, cma, tokenizers and click alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKED = ("torch", "transformers", "optimum", "onnx", "bbt_onnx_export")


def test_tune_and_evaluate_run_with_torch_and_transformers_unimportable(tiny_model, data_dir, tmp_path):
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = {BLOCKED!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        from click.testing import CliRunner
        from bbt_onnx.cli import cli
        args = ["tune", "--model", {str(tiny_model)!r}, "--task", "sst2", "--data", {str(data_dir / "pool.csv")!r},
                "--out", {str(tmp_path / "run")!r}, "--prompt-tokens", "4", "--intrinsic-dim", "10",
                "--popsize", "10", "--budget", "20", "-q"]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(cli, ["evaluate", "--model", {str(tiny_model)!r}, "--prompt", {str(tmp_path / "run")!r},
                                     "--data", {str(data_dir / "test.csv")!r}])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(cli, ["export", "--model", "x", "--out", "y"])
        assert r.exit_code == 2 and "`export` extra" in r.stderr, r.output
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_a_healthy_run_shows_no_third_party_warning(tmp_path):
    """Without matplotlib, pycma warns at import that it cannot plot; bbt-onnx plots with its own code, so no
    warning reaches the user (warnings are errors here)."""
    script = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "matplotlib":
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import bbt_onnx.cli, bbt_onnx.tuning.tuner, bbt_onnx.jobs.bench
    """)
    out = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr

def test_the_runtime_loads_without_pyplot_and_leaves_a_hosts_pyplot_alone():
    """pycma would import matplotlib's pyplot at every start (a quarter of a second, and a GUI backend chosen in
    the host); bbt-onnx hides it while pycma loads, and leaves it importable, or loaded when the host had it."""
    script = textwrap.dedent("""
        import importlib, json, sys
        import bbt_onnx.cli, bbt_onnx.jobs.tune
        bare = "matplotlib.pyplot" in sys.modules
        import matplotlib.pyplot as host  # importable afterwards; now the host has it
        importlib.reload(bbt_onnx.cmaes)  # bbt-onnx loaded again, by a host that uses pyplot
        print(json.dumps({"bare": bare, "host": sys.modules.get("matplotlib.pyplot") is host}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Warning" not in out.stderr, out.stderr
    assert json.loads(out.stdout) == {"bare": False, "host": True}
