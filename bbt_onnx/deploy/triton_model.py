"""A deployed classifier as a Triton python-backend model: onnxruntime (with onnxruntime-extensions, or the
tokenizers package for a graph that takes ids) and numpy only.

`bbt-onnx deploy --format triton --backend python` and `bbt-onnx serve --prompt` copy this file into a model
repository as NAME/1/model.py, beside classifier.onnx. Triton's dynamic batcher hands it several requests at once:
their texts are checked (UTF-8, at most the configured bytes each; a refused request is one line with status 400,
and the others still run), then classified in one call, and each request gets its own rows back.
"""

import glob
import importlib.util
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class Refused(Exception):
    """A request this model will not run, and why."""


def extensions_library():
    """onnxruntime-extensions' custom-op library, found without importing the package (whose import is slow)."""
    spec = importlib.util.find_spec("onnxruntime_extensions")
    if spec is None or spec.origin is None:
        raise RuntimeError("onnxruntime-extensions is not installed where tritonserver's python backend runs")
    found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "_extensions_pydll*")))
    if found:
        return found[0]
    import onnxruntime_extensions

    return onnxruntime_extensions.get_library_path()


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.fields = [i["name"] for i in config["input"]]
        self.max_bytes = int(params.get("bbt_max_text_bytes", str(1 << 20)))
        opts = ort.SessionOptions()
        threads = int(params.get("bbt_threads", "0"))
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        recipe = os.path.join(folder, "recipe.json")
        self.encode = None
        if os.path.exists(recipe):  # the tokenizer outside the graph: encode.py builds the graph's inputs
            sys.path.insert(0, folder)
            from encode import encode
            from tokenizers import Tokenizer

            with open(recipe, encoding="utf-8") as f:
                self.recipe = json.load(f)
            self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
            self.encode = encode
        else:
            opts.register_custom_ops_library(extensions_library())
        self.session = ort.InferenceSession(os.path.join(folder, "classifier.onnx"), sess_options=opts,
                                            providers=["CPUExecutionProvider"])

    def texts(self, request):
        """The request's texts per field, as str, every one checked."""
        out = {}
        for name in self.fields:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise Refused(f"the request has no {name!r} input")
            values = tensor.as_numpy().reshape(-1)
            texts = []
            for value in values:
                raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
                if len(raw) > self.max_bytes:
                    raise Refused(f"a {name} of {len(raw)} bytes is over the limit of {self.max_bytes}")
                try:
                    texts.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise Refused(f"a {name} is not UTF-8 text") from None
            out[name] = texts
        counts = {len(v) for v in out.values()}
        if len(counts) != 1:
            raise Refused("text and text_b must hold as many texts")
        return out

    def execute(self, requests):
        checked, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                checked.append((i, self.texts(request)))
            except Refused as exc:
                responses[i] = error(str(exc), pb_utils.TritonError.INVALID_ARG)
        if checked:
            try:
                joined = {f: [t for _, texts in checked for t in texts[f]] for f in self.fields}
                probabilities, label = self.classify(joined)
                start = 0
                for i, texts in checked:
                    n = len(texts[self.fields[0]])
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor("probabilities", np.ascontiguousarray(probabilities[start:start + n])),
                        pb_utils.Tensor("label", np.ascontiguousarray(label[start:start + n].reshape(n, 1)))])
                    start += n
            except Exception as exc:  # noqa: BLE001 - one line back to every client of the batch, never a traceback
                message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                for i, _ in checked:
                    responses[i] = error(message)
        return responses

    def classify(self, texts):
        """[N, K] float32 probabilities and [N] int64 labels for the texts (by field)."""
        if self.encode is not None:
            feeds = self.encode(self.recipe, self.tokenizer, texts["text"], texts.get("text_b"))
        else:
            feeds = {f: np.array(v, dtype=object) for f, v in texts.items()}
        probabilities, label = self.session.run(["probabilities", "label"], feeds)
        return probabilities.astype(np.float32), label.astype(np.int64)


def error(message, code=None):
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)
