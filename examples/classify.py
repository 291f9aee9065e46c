"""Label texts with a classifier written by `bbt-onnx deploy`: onnxruntime, onnxruntime-extensions and numpy alone.

    python examples/classify.py runs/demo-bbc-classifier/classifier.onnx "shares fell as rates rose" "the champions won the cup"
"""

import json
import sys

import numpy as np
import onnxruntime as ort
import onnxruntime_extensions

path, texts = sys.argv[1], sys.argv[2:]
opts = ort.SessionOptions()
opts.register_custom_ops_library(onnxruntime_extensions.get_library_path())
clf = ort.InferenceSession(path, opts)
probabilities, label = clf.run(["probabilities", "label"], {"text": np.array(texts, dtype=object)})
names = json.loads(clf.get_modelmeta().custom_metadata_map["labels"])
for text, p, i in zip(texts, probabilities, label):
    print(f"{names[i]:>10} {p[i]:.3f}  {text}")
