"""The deployed classifier as a Triton model: `deploy --format triton`, and `serve --prompt`'s NAME.classify.

Unlike the scoring model, whose one client sends a whole population per request, a classifier is called by many
users with a text each: the model batches (`max_batch_size`, dynamic batching with a short queue delay), and
takes `text` (and `text_b` for a pair task) as BYTES [1] per item, giving `probabilities` [K] and `label` [1].
Two backends:
- `onnxruntime`, a stock tritonserver's: classifier.onnx runs in Triton's onnxruntime backend, the
  onnxruntime-extensions library named in `model_operations` (the tokenizer ops), the graph's [N] text input and
  label output reshaped to the batch dimension alone;
- `python`: classifier.onnx in onnxruntime inside Triton's python backend (`triton_model.py` as model.py), which
  checks every text (UTF-8, size) before the batch runs; a graph that takes ids gets its recipe and tokenizer
  beside it and encodes there. This is the variant `bbt-onnx serve` runs.
The config's parameters name what is served (`bbt_prompt_sha256`, `bbt_fingerprint`, the labels), so that a
client can check it is the classifier of its run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..engines.served import FINGERPRINT_PARAM, LABELS_PARAM, PROMPT_PARAM
from ..model_repository import add_model as add_repository_model
from .build import Classifier
from .extensions import extensions_library

MAX_BATCH = 64  # texts per batch the server forms
QUEUE_DELAY_US = 2000  # how long a text may wait for others to join its batch
MAX_TEXT_BYTES = 1 << 20  # one text, as the runtime's readers limit a row
MODEL_PY = Path(__file__).with_name("triton_model.py")


@dataclass(frozen=True)
class ClassifierModel:
    """One classifier of a repository, and how it runs."""

    name: str
    clf: Classifier
    backend: str = "python"
    instances: int = 1
    threads: int | None = None
    batching: bool = True
    op_library: str | None = None  # onnxruntime backend: the extensions library's path on the server


def classifier_config(model: ClassifierModel):
    """The classifier's ModelConfig message."""
    from tritonclient.grpc import model_config_pb2 as pb

    clf = model.clf
    config = pb.ModelConfig(name=model.name, backend=model.backend, max_batch_size=MAX_BATCH)
    fields = [i.name for i in clf.model.graph.input] if clf.inputs == "text" else clf.recipe["fields"]
    bare = model.backend == "onnxruntime"  # the graph's own [N] inputs and label: the batch dimension alone
    for name in fields:
        item = config.input.add(name=name, data_type=pb.TYPE_STRING, dims=[1])
        if bare:
            item.reshape.SetInParent()
    config.output.add(name="probabilities", data_type=pb.TYPE_FP32, dims=[len(clf.labels)])
    label = config.output.add(name="label", data_type=pb.TYPE_INT64, dims=[1])
    if bare:
        label.reshape.SetInParent()
    if model.batching:
        config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    config.instance_group.add(count=model.instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    params = {PROMPT_PARAM: clf.metadata["prompt_sha256"], FINGERPRINT_PARAM: clf.metadata["model_fingerprint"],
              LABELS_PARAM: json.dumps(list(clf.labels)), "bbt_result": clf.metadata["result"],
              "bbt_max_text_bytes": str(MAX_TEXT_BYTES), "bbt_threads": str(model.threads or 0)}
    if bare:
        config.default_model_filename = "classifier.onnx"
        config.model_operations.op_library_filename.append(model.op_library or extensions_library())
        params.update(intra_op_thread_count=str(model.threads or 0), inter_op_thread_count="1")
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def add_classifier(repository: Path, model: ClassifierModel, write: Callable[[Path], dict]) -> dict:
    """REPOSITORY/NAME/config.pbtxt and REPOSITORY/NAME/1/ with what `write(folder)` puts there (the classifier, and
    its recipe for an ids graph), plus model.py for the python backend; `write`'s report."""
    from google.protobuf import text_format

    config = text_format.MessageToString(classifier_config(model))  # refused before anything is written
    return add_repository_model(repository, model.name, config, write,
                                MODEL_PY if model.backend == "python" else None)
