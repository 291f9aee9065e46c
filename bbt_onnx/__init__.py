"""bbt-onnx: Black-Box Tuning (Sun et al., ICML 2022) over forward-only ONNX Runtime engines.

The runtime needs onnxruntime, numpy, cma, tokenizers and click; it never imports torch. `bbt_onnx.tune(...)` runs
what `bbt-onnx tune` runs and hands back a `Run`; `Classifier.load(model_dir, run)` predicts with a run's result.
"""

from .version import __version__  # noqa: F401

from .tuning import checkpoint  # noqa: E402
from .data import DataSpec, Example, k_shot_split, load_splits, read_examples  # noqa: E402
from .encoding import EncodedSet, Encoder  # noqa: E402
from .engines import Engine, EngineSpec, OrtEngine, OrtSpec, Remote, TritonEngine, TritonSpec  # noqa: E402
from .errors import (BBTError, DataError, ModelError, PromptError, RunError, ServerError, SettingsError,  # noqa: E402
                     StorageError)
from .manifest import Manifest, load_manifest  # noqa: E402
from .model import Model  # noqa: E402
from .prompt import Evaluation, Prediction, PromptEnsemble, TunedPrompt, load_prompt  # noqa: E402
from .tasks import PRESETS, Task, resolve_task  # noqa: E402
from .seeding import generator  # noqa: E402
from .tuning.tuner import BlackBoxTuner, FitReport, GenerationEvent, TuneConfig, TunerState  # noqa: E402
from .choice import ChoicePolicy  # noqa: E402
from .classifier import Classifier  # noqa: E402
from .api import Run, tune  # noqa: E402

__all__ = ["BBTError", "BlackBoxTuner", "ChoicePolicy", "Classifier", "DataError", "DataSpec", "EncodedSet",
           "Encoder", "Engine", "EngineSpec",
           "Evaluation", "Example", "FitReport", "GenerationEvent", "Manifest", "Model", "ModelError", "OrtEngine",
           "OrtSpec", "PRESETS", "Prediction", "PromptEnsemble", "PromptError", "Remote", "Run",
           "RunError", "ServerError", "SettingsError",
           "StorageError", "Task", "TritonEngine", "TritonSpec", "TuneConfig", "TunedPrompt", "TunerState",
           "checkpoint", "generator", "k_shot_split", "load_manifest", "load_prompt", "load_splits", "read_examples", "resolve_task",
           "tune"]
