"""The evaluate job (`bbt-onnx evaluate`): a run's result, its z = 0, or a task's bare template, scored on a
labelled file."""

from __future__ import annotations

from pathlib import Path

from ..data import check_labels, read_examples
from ..demos import DemoSpec, refuse_with_run
from ..engines import EngineSpec, OrtSpec
from ..model import Model
from ..progress import RowProgress, no_progress
from ..prompt import load_run_prompt, template_prompt
from ..tasks import TaskSpec


def evaluate(model_dir: str | Path, data: str, prompt: str | Path | None = None, task: TaskSpec = TaskSpec(),
             engine: EngineSpec = OrtSpec(), no_prompt: bool = False, prompt_tokens: int | None = None,
             progress: RowProgress = no_progress, demos: DemoSpec = DemoSpec()) -> dict:
    """The metrics of `prompt` (a run, or its prompt file) on `data`; with `no_prompt`, z = 0 (the run's start, or
    the template with `prompt_tokens` slots, and `demos`' demonstrations, when there is no run)."""
    result = load_run_prompt(prompt, no_prompt, task.given, prompt_tokens)
    refuse_with_run(demos, result)
    model = Model.load(model_dir, engine, deep=result is not None and result.deep)
    result = result or template_prompt(model.manifest, demos.apply(task.resolve()), prompt_tokens)
    rows = read_examples(data)
    check_labels(rows, result.task.label_keys, data)
    result.check_model(model)
    enc = result.encoder(model).encode(rows)  # every row checked before progress starts
    with progress(len(rows), "scoring") as advance:
        scores = result.evaluate(model, enc, on_batch=advance).to_json()
    scores.update(task=result.task.name, prompt="none (z = 0)" if no_prompt else str(prompt),
                  provider=model.engine.provider)
    return scores
