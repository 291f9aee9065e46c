"""A bbt-onnx prompt graph as a Triton python-backend model: numpy and onnxruntime only.

`bbt-onnx triton-repo --backend python` and `bbt-onnx serve` copy this file into a model repository as
NAME/1/model.py, beside the graph (NAME/1/model.onnx). Every request is checked against the model's limits (its
config's `bbt_*` parameters) before anything is allocated for it or run: a client's mistake is answered as one line
with status 400 (INVALID_ARG), never a traceback; an unexpected failure is one line with status 500.

serve's NAME.cached (`bbt_mode` cached) scores rows after a shared prefix (demonstrations) on the model
directory's cached pair, through bbt-onnx's own engine (so this mode needs bbt-onnx, which serve has): the prefix's
keys and values are computed once per server and prefix ids, kept least recently used first within
`bbt_kv_cache_bytes`, and a request's rows are planned and run exactly as in the process.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

OUTPUT = "label_logits"
PREFIX_RUNS = "prefix_runs"  # NAME.cached's second output: the prefixes it has computed so far
CONFIG_TYPES = {"TYPE_INT64": np.int64, "TYPE_FP32": np.float32, "TYPE_FP16": np.float16}
INT_INPUTS = ("input_ids", "attention_mask", "mask_pos", "label_ids", "prompt_pos", "prompt_layer")


class Refused(Exception):
    """A request this model will not run, and why."""


def parameters(config):
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        p = parameters(config)
        self.limits = {k: int(p[k]) for k in ("bbt_max_request", "bbt_max_prompts", "bbt_prompt_tokens",
                                             "bbt_hidden_size", "bbt_vocab_size", "bbt_max_positions",
                                             "bbt_max_labels", "bbt_layers")}
        self.deep = p.get("bbt_deep") == "1"
        self.engine = None
        if p.get("bbt_mode") == "cached":
            self.open_cached(config, p)
            return
        path = os.path.join(args["model_repository"], args["model_version"], p.get("bbt_graph", "model.onnx"))
        opts = ort.SessionOptions()
        threads = int(p.get("bbt_threads", "0"))
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # the provider and its options as the repository wrote them from the device's record (on CUDA, TF32 off:
        # fp32 means fp32, as in bbt-onnx's own engine)
        providers = [(p.get("bbt_provider", "CPUExecutionProvider"), json.loads(p.get("bbt_provider_options", "{}")))]
        self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.dtypes = {name: (np.float16 if i.type == "tensor(float16)" else np.float32 if "float" in i.type
                              else np.int64) for name, i in self.inputs.items()}

    def open_cached(self, config, p):
        """bbt-onnx's engine on the model directory's cached pair (the graphs checked against their sha256)."""
        from bbt_onnx.engines.ort import OrtEngine
        from bbt_onnx.manifest import load_manifest

        threads = int(p.get("bbt_threads", "0"))
        self.engine = OrtEngine(load_manifest(p["bbt_model_dir"]), device=p.get("bbt_device", "cpu"),
                                threads=threads or None, kv_cache=True, kv_cache_limit=int(p["bbt_kv_cache_bytes"]))
        self.inputs = {i["name"]: None for i in config["input"]}
        self.dtypes = {i["name"]: CONFIG_TYPES[i["data_type"]] for i in config["input"]}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = self.feeds(request)
                if self.engine is not None:
                    out = self.cached_outputs(feeds)
                else:
                    logits = self.session.run([OUTPUT], feeds)[0]
                    out = [pb_utils.Tensor(OUTPUT, np.ascontiguousarray(logits, dtype=np.float32))]
                responses.append(pb_utils.InferenceResponse(output_tensors=out))
            except Refused as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
            except Exception as exc:  # noqa: BLE001 - one line back to the client, never a traceback
                message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)))
        return responses

    def cached_outputs(self, feeds):
        """The rows after their shared prefix, scored by the engine as in the process; a request the engine refuses
        (a prefix over the byte bound) is the client's mistake."""
        from bbt_onnx.encoding import EncodedSet
        from bbt_onnx.errors import BBTError

        ids = feeds["input_ids"]
        prefix = feeds["prefix_ids"]
        if prefix.ndim != 1 or prefix.size < 1 or prefix.size + ids.shape[1] > self.limits["bbt_max_positions"]:
            raise Refused(f"prefix_ids must be [S_p] ids with 1 <= S_p and S_p plus the {ids.shape[1]} tokens of a "
                          f"row within the model's {self.limits['bbt_max_positions']} positions")
        if not ((prefix >= 0) & (prefix < self.limits["bbt_vocab_size"])).all():
            raise Refused("prefix_ids holds ids outside the vocabulary")
        batch = EncodedSet(ids, feeds["attention_mask"], feeds["mask_pos"], np.full(len(ids), -1, np.int64),
                           feeds["label_ids"], prompt_pos=feeds["prompt_pos"], prefix_ids=prefix)
        try:
            logits = self.engine.label_logits(feeds["prompt_embeds"], batch)
        except BBTError as exc:
            raise Refused(str(exc)) from None
        return [pb_utils.Tensor(OUTPUT, np.ascontiguousarray(logits, dtype=np.float32)),
                pb_utils.Tensor(PREFIX_RUNS, np.array([self.engine.prefix_runs], np.int64))]

    def feeds(self, request):
        """The graph's inputs from the request, every shape, range and size checked first."""
        got = {}
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise Refused(f"the request has no {name!r} input")
            got[name] = tensor.as_numpy()
        lim = self.limits
        ids, mask, prompts, labels = got["input_ids"], got["attention_mask"], got["prompt_embeds"], got["label_ids"]
        if ids.ndim != 2 or mask.shape != ids.shape or min(ids.shape) < 1:
            raise Refused(f"input_ids and attention_mask must be [N, T] alike, got {ids.shape} and {mask.shape}")
        n, t = ids.shape
        if t > lim["bbt_max_positions"]:
            raise Refused(f"rows of {t} tokens are longer than the model's {lim['bbt_max_positions']} positions")
        if prompts.ndim != 3 or prompts.shape[0] < 1 or prompts.shape[2] != lim["bbt_hidden_size"]:
            raise Refused(f"prompt_embeds must be [C, P, {lim['bbt_hidden_size']}], got {prompts.shape}")
        c, p = prompts.shape[:2]
        if c > lim["bbt_max_prompts"]:
            raise Refused(f"a request of {c} prompts is over the server's limit of {lim['bbt_max_prompts']}")
        if p > lim["bbt_prompt_tokens"]:
            raise Refused(f"a prompt of {p} tokens is longer than the {lim['bbt_prompt_tokens']} exported")
        if c * n * t > lim["bbt_max_request"]:
            raise Refused(f"a request of {c} prompts x {n} rows x {t} tokens = {c * n * t} is over the server's "
                          f"limit of {lim['bbt_max_request']} (C x N x T)")
        if labels.ndim != 1 or not 1 <= labels.shape[0] <= lim["bbt_max_labels"]:
            raise Refused(f"label_ids must be [K] with 1 <= K <= {lim['bbt_max_labels']}, got {labels.shape}")
        for name in ("mask_pos", "prompt_pos"):
            if name in got and (got[name].shape != (n,) or not ((got[name] >= 0) & (got[name] < t)).all()):
                raise Refused(f"{name} must be [N] positions within the {t} tokens of each row")
        vocab = lim["bbt_vocab_size"]
        for name, value in (("input_ids", ids), ("label_ids", labels)):
            if value.size and not ((value >= 0) & (value < vocab)).all():
                raise Refused(f"{name} holds ids outside the vocabulary of {vocab}")
        if not np.isfinite(prompts).all():
            raise Refused("prompt_embeds holds NaN or infinite numbers")
        if self.deep:
            layers, layer = got["deep_prompts"], got["prompt_layer"]
            if layers.shape != (lim["bbt_layers"], p, lim["bbt_hidden_size"]) or not np.isfinite(layers).all():
                raise Refused(f"deep_prompts must be [{lim['bbt_layers']}, {p}, {lim['bbt_hidden_size']}] and "
                              f"finite, got {layers.shape}")
            if layer.size != 1 or not 0 <= int(layer.reshape(-1)[0]) < lim["bbt_layers"]:
                raise Refused(f"prompt_layer must be one layer in 0..{lim['bbt_layers'] - 1}")
            got["prompt_layer"] = layer.reshape((1,) * len(self.inputs["prompt_layer"].shape))
        return {name: np.ascontiguousarray(value, dtype=self.dtypes[name]) for name, value in got.items()}
