"""The predict job (`bbt-onnx predict`): texts labelled with a run's result, as JSONL lines (text, label and
per-label probabilities), through a server's classifier of this very result when there is one."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Callable

from ..data import read_input
from ..engines import EngineSpec, OrtSpec
from ..fileio import check_output_file, check_writable, dumps, write_text_atomic
from ..model import Model
from ..progress import RowProgress, no_progress
from ..prompt import label_rows, load_prompt
from ..runs import run_of


def predict(model_dir: str | Path, prompt: str | Path, input_path: str, output: Path | None = None,
            engine: EngineSpec = OrtSpec(), stdin: BinaryIO | None = None, log: Callable[[str], None] = lambda _m: None,
            progress: RowProgress = no_progress) -> tuple[str, int]:
    """The JSONL lines and their count; written atomically to `output` when given (never a file the job reads).
    `input_path` "-" reads `stdin`."""
    if output:
        check_writable(output)
        check_output_file(output, [("input", input_path), ("model directory", model_dir), ("run", prompt),
                                   ("run", run_of(prompt))])
    result = load_prompt(prompt)
    model = Model.load(model_dir, engine, deep=result.deep)
    result.check_model(model)
    rows = read_input(input_path, stdin)
    enc = result.encoder(model).encode(rows)  # every row checked before progress starts
    with progress(len(rows), "predicting") as advance:
        preds = label_rows(result, model, rows, enc, prompt, log=log, on_batch=advance)
    lines = "".join(dumps({"text": r.text, **({"text_b": r.text_b} if r.text_b else {}), "label": p.label,
                           "probabilities": p.probabilities}) + "\n" for r, p in zip(rows, preds))
    if output:
        write_text_atomic(output, lines)
    return lines, len(preds)
