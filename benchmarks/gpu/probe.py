"""What the device offers: versions, where each package comes from, onnxruntime's providers after
preload_dlls(), a one-node graph on the chosen device, the GPU (torch and nvidia-smi).

usage: python benchmarks/gpu/probe.py [--device cuda] [--json-out FILE]; exits 1 when --device cuda cannot run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def version_of(name: str) -> dict:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report any import failure
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return {"version": getattr(mod, "__version__", None), "file": getattr(mod, "__file__", None)}


def smoke(device: str) -> dict:
    """A MatMul on the device through onnxruntime, checked against numpy."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "smoke",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [64, 64]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [64, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[device]
    t0 = time.perf_counter()
    options = {"use_tf32": "0"} if device == "cuda" else {}  # TF32 would miss the 1e-3 check below
    sess = ort.InferenceSession(model.SerializeToString(), providers=[(provider, options)])
    a = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    c = sess.run(None, {"a": a, "b": a})[0]
    return {"providers": sess.get_providers(), "max_abs_diff": float(np.abs(c - a @ a).max()),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    info = {"python": sys.version, "machine": platform.machine(), "sys_path_head": sys.path[:6]}
    import onnxruntime as ort

    info["onnxruntime"] = {"version": ort.__version__, "file": ort.__file__, "device": ort.get_device()}
    if hasattr(ort, "preload_dlls"):
        try:
            if args.device == "cuda":
                ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels that torch brought
            info["onnxruntime"]["preload_dlls"] = "ok" if args.device == "cuda" else "not called (cpu)"
        except Exception as exc:  # noqa: BLE001
            info["onnxruntime"]["preload_dlls"] = f"{type(exc).__name__}: {exc}"
    info["onnxruntime"]["available_providers"] = ort.get_available_providers()
    # before torch is imported: torch would load the CUDA libraries itself and hide a failed preload
    ok = True
    try:
        info["smoke"] = smoke(args.device)
        want = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[args.device]
        ok = info["smoke"]["providers"][0] == want and info["smoke"]["max_abs_diff"] < 1e-3
    except Exception as exc:  # noqa: BLE001
        info["smoke"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        ok = False
    for name in ("numpy", "cma", "click", "tokenizers", "gguf", "onnx", "torch", "transformers", "bbt_onnx",
                 "bbt_onnx_export"):
        info[name] = version_of(name)
    try:
        import torch

        info["torch"]["cuda"] = torch.version.cuda
        info["torch"]["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["torch"]["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001
        info["torch"]["cuda_error"] = str(exc)[:300]
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        info["nvidia_smi"] = f"unavailable: {exc}"
    info["ok"] = ok
    text = json.dumps(info, indent=2, default=str)
    if args.json_out:
        args.json_out.write_text(text)
    print(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
