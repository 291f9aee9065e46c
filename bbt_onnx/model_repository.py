"""A Triton model repository on disk, written and recognised in one place: one folder per model, holding
config.pbtxt and version 1/ (a scoring graph from `triton-repo` and `serve`, or a classifier from `deploy --format
triton`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, TypeVar

from .fileio import OutputKind, only_files, write_text_atomic

CONFIG = "config.pbtxt"
VERSION = "1"
BACKENDS = ("onnxruntime", "python")
GRAPHS = ("model.onnx", "classifier.onnx")  # what a version folder serves: a scoring graph, or a classifier
VERSION_FILES = (*GRAPHS, "classifier.onnx.data", "recipe.json", "encode.py", "tokenizer.json", "model.py")
# the one file beside the model folders: `triton-repo --kserve`'s InferenceService (tritonserver loads folders only)
SERVICE_MANIFEST = "inferenceservice.yaml"

Report = TypeVar("Report")


def add_model(repository: Path, name: str, config: str, fill: Callable[[Path], Report],
              model_py: Path | None = None) -> Report:
    """REPOSITORY/NAME/1/ filled by `fill(folder)` (plus `model_py` as model.py for the python backend), then
    REPOSITORY/NAME/config.pbtxt with `config`, the text of a ModelConfig; `fill`'s report."""
    version = repository / name / VERSION
    version.mkdir(parents=True, exist_ok=True)
    report = fill(version)
    if model_py is not None:
        shutil.copyfile(model_py, version / "model.py")
    write_text_atomic(repository / name / CONFIG, config)
    return report


def looks_like_repository(directory: Path) -> bool:
    """What `--force` may replace: model folders of config.pbtxt (onnxruntime or python backend) and 1/ holding a
    graph and the files that go with it, and at most an InferenceService manifest beside them, nothing else."""
    try:
        models = [p for p in directory.iterdir()
                  if not (p.name == SERVICE_MANIFEST and p.is_file() and not p.is_symlink())]
    except OSError:
        return False
    for model in models:
        version = model / VERSION
        if model.is_symlink() or not model.is_dir() or sorted(p.name for p in model.iterdir()) != [VERSION, CONFIG] \
                or not only_files(version, lambda n: n in VERSION_FILES) \
                or not any((version / g).is_file() for g in GRAPHS):
            return False
        try:
            config = (model / CONFIG).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return False
        if not any(f'backend: "{b}"' in config for b in BACKENDS):
            return False
    return bool(models)


REPOSITORY = OutputKind("a model repository (`bbt-onnx triton-repo`, or `deploy --format triton`)",
                        looks_like_repository)
