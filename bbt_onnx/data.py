"""Labelled rows from CSV/TSV/JSONL files or Hugging Face datasets, and seeded k-shot sampling."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import DataError, SettingsError
from .options import setting

MAX_ROW_CHARS = 1_000_000  # one row's text fields together; far beyond any model's positions
TEXT_COLUMNS = ("text", "sentence", "sentence1", "content", "premise")
TEXT_B_COLUMNS = ("text_b", "sentence2", "hypothesis")
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class Example:
    text: str
    text_b: str | None = None
    label: str | None = None


def as_examples(rows) -> list[Example]:
    """Rows as the API takes them: Example rows, or plain texts (unlabelled); one text alone is one row."""
    if isinstance(rows, (str, Example)):
        rows = [rows]
    try:
        items = list(rows)
    except TypeError:
        raise DataError(f"rows must be a list of texts or Example rows, got {type(rows).__name__}", "rows") from None
    for i, row in enumerate(items, start=1):
        if isinstance(row, Example):
            if not isinstance(row.text, str) or not (row.text_b is None or isinstance(row.text_b, str)):
                raise DataError(f"row {i} is an Example whose text is not a string", "rows")
            if row.label is not None and not isinstance(row.label, str):
                items[i - 1] = Example(row.text, row.text_b, _label_str(row.label))
        elif not isinstance(row, str):
            raise DataError(f"row {i} is a {type(row).__name__}; give texts (str) or Example rows", "rows")
    if not items:
        raise DataError("no rows", "rows")
    checked = rows_to_examples([{"text": r if isinstance(r, str) else r.text} for r in items], ["text"], "the rows",
                               need_label=False)  # empty or oversized texts are refused as in a file
    return [c if isinstance(r, str) else r for c, r in zip(checked, items)]


def _label_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _pick(columns: Sequence[str], wanted: Sequence[str]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[w] for w in wanted if w in lowered), None)


def rows_to_examples(rows: Iterable[dict], columns: Sequence[str], source: str, need_label: bool) -> list[Example]:
    text_col = _pick(columns, TEXT_COLUMNS)
    if text_col is None:
        raise DataError(f"{source} has no text column (one of: {', '.join(TEXT_COLUMNS)}); "
                       f"its columns are: {', '.join(columns) or 'none'}")
    b_col = _pick(columns, TEXT_B_COLUMNS)
    label_col = _pick(columns, (LABEL_COLUMN,))
    if need_label and label_col is None:
        raise DataError(f"{source} has no 'label' column; its columns are: {', '.join(columns)}")
    out = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{source} row {i} is not a JSON object with a {text_col!r} field")
        text = row.get(text_col)
        if text is None or not str(text).strip():
            raise DataError(f"{source} row {i}: empty {text_col!r}")
        label = _label_str(row.get(label_col)) if label_col else None
        if need_label and label is None:
            raise DataError(f"{source} row {i}: empty label")
        b = row.get(b_col) if b_col else None
        size = len(str(text)) + (len(str(b)) if b is not None else 0)
        if size > MAX_ROW_CHARS:
            raise DataError(f"{source} row {i} holds {size:,} characters; one row may hold at most "
                            f"{MAX_ROW_CHARS:,} (the model reads only its first few hundred tokens): shorten it")
        out.append(Example(str(text).strip(), None if b is None else str(b).strip(), label))
    if not out:
        raise DataError(f"{source} has no rows")
    return out


def read_examples(path: str | Path, need_label: bool = True) -> list[Example]:
    """CSV, TSV (by extension) or JSONL with a header naming `text`|`sentence`, `text_b`|`sentence2`, `label`."""
    path = Path(path)
    if str(path).startswith("hf:"):
        return load_hf(str(path), "train", need_label)
    if path.is_dir():
        raise DataError(f"data file {path} is a folder, not a file")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not raw.strip():
        raise DataError(f"{path} is empty")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(raw, path, need_label)
    if suffix in (".csv", ".tsv", ".txt"):
        delim = "\t" if suffix == ".tsv" else ","
        if suffix == ".txt":
            delim = "\t" if "\t" in raw.splitlines()[0] else ","
        limit = csv.field_size_limit(MAX_ROW_CHARS)  # restored below: the csv module's limit is process-wide
        try:
            reader = csv.DictReader(io.StringIO(raw, newline=""), delimiter=delim)
            columns = reader.fieldnames or []
            rows = list(reader)
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                raise DataError(f"{path} has a field of over {MAX_ROW_CHARS:,} characters; one row may hold at "
                                "most that (the model reads only its first few hundred tokens): shorten it") from None
            raise DataError(f"{path} is not valid {'TSV' if delim == chr(9) else 'CSV'}: {exc}") from None
        finally:
            csv.field_size_limit(limit)
        if any(None in r for r in rows):
            bad = next(i for i, r in enumerate(rows, 1) if None in r)
            raise DataError(f"{path} row {bad} has more fields than the header")
        return rows_to_examples(rows, columns, str(path), need_label)
    raise DataError(f"{path}: unknown data format {suffix!r}; use .csv, .tsv or .jsonl")


def _read_jsonl(raw: str, path: Path, need_label: bool) -> list[Example]:
    rows = json_objects(raw, str(path))
    return rows_to_examples(rows, list(dict.fromkeys(k for r in rows for k in r)), str(path), need_label)


def json_objects(text: str, source: str) -> list[dict]:
    """One JSON object per non-blank line; anything else names its line."""
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source} line {i} is not JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{source} line {i} is not a JSON object")
        rows.append(obj)
    return rows


def read_input(path: str, stdin=None) -> list[Example]:
    """Rows to label: a data file (its label column, if any, ignored), or text lines / JSON lines from a .txt file
    or from `stdin` (a binary stream) when `path` is "-"."""
    if path != "-" and not path.endswith(".txt"):
        return read_examples(path, need_label=False)
    if path == "-":
        raw, source = (stdin or sys.stdin.buffer).read(), "stdin"
    else:
        try:
            raw, source = Path(path).read_bytes(), path
        except OSError as exc:
            from .fileio import storage_error

            raise storage_error(path, exc, "read") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{source} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
    return parse_lines(text, source)


def parse_lines(text: str, source: str) -> list[Example]:
    """One text per non-blank line, or JSON lines (objects with a text field) when the first one is JSON."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{source} holds no text")
    if lines[0].lstrip().startswith("{"):
        rows = json_objects(text, source)
        return rows_to_examples(rows, list(dict.fromkeys(k for r in rows for k in r)), source, need_label=False)
    return rows_to_examples(({"text": line} for line in lines), ["text"], source, need_label=False)


def load_hf(spec: str, split: str, need_label: bool = True) -> list[Example]:
    """`hf:glue/sst2` -> datasets.load_dataset("glue", "sst2", split=...); unlabelled rows (-1) are dropped."""
    name = spec[3:]
    if not name:
        raise DataError("hf: needs a dataset name, e.g. hf:glue/sst2")
    try:
        import datasets  # noqa: PLC0415 - optional
    except ImportError:
        raise DataError(f"{spec} needs the `datasets` package (pip install datasets); or pass a local CSV/TSV/JSONL file") from None
    path, _, config = name.partition("/")
    try:
        ds = datasets.load_dataset(path, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for offline/missing
        raise DataError(f"cannot load {spec} split {split!r} from the Hugging Face hub ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200]}); offline, pass local files instead") from None
    rows = [r for r in ds if LABEL_COLUMN not in r or r[LABEL_COLUMN] is None or int(r[LABEL_COLUMN]) >= 0]
    return rows_to_examples(rows, list(ds.column_names), f"{spec}[{split}]", need_label)


def hf_test_split(spec: str) -> list[Example]:
    """The labelled evaluation split: `test` when it has labels, else `validation` (as the reference does)."""
    try:
        return load_hf(spec, "test")
    except DataError:
        return load_hf(spec, "validation")


def check_labels(examples: Sequence[Example], keys: Sequence[str], source: str, argument: str | None = None) -> None:
    """Every row's label is one of the task's; `source` names the rows, `argument` the argument they came from."""
    unknown = Counter(e.label for e in examples if e.label not in keys)
    if unknown:
        shown = ", ".join(f"{k!r} ({n} rows)" for k, n in unknown.most_common(5))
        raise DataError(f"{source} has rows whose label the task does not know: {shown}; the task's label names are "
                        f"{', '.join(keys)} (name them with labels name=word,...)",
                        ("labels",) if argument is None else (argument, "labels"))


def k_shot_split(examples: Sequence[Example], keys: Sequence[str], k: int, rng: np.random.Generator,
                 with_dev: bool = True) -> tuple[list[Example], list[Example]]:
    """The reference's true few-shot split: shuffle, then take k per class for train and the next k for dev (the
    few-shot sampler of `tune --data`; `rng` is its stream, `bbt_onnx.seeding.generator(seed, "sampling")`)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SettingsError(f"k_shot must be at least 1, got {k!r}", "k_shot")
    if not isinstance(rng, np.random.Generator):
        raise SettingsError(f"rng must be a numpy Generator, got {type(rng).__name__}", "rng")
    examples = as_examples(examples)
    need = 2 * k if with_dev else k
    counts = Counter(e.label for e in examples)
    for key in keys:
        if counts[key] < need:
            what = f"k={k} for train and k={k} for dev need {need}" if with_dev else f"k={k} needs {k}"
            raise DataError(f"class {key!r} has only {counts[key]} examples; {what} (lower k_shot)", "k_shot")
    order = rng.permutation(len(examples))
    train, dev = [], []
    taken_train, taken_dev = Counter(), Counter()
    for i in order:
        e = examples[i]
        if taken_train[e.label] < k:
            train.append(e)
            taken_train[e.label] += 1
        elif with_dev and taken_dev[e.label] < k:
            dev.append(e)
            taken_dev[e.label] += 1
    return train, dev


def per_class(examples: Sequence[Example], keys: Sequence[str], k: int, order: Sequence[int]) -> list[Example]:
    """The first k rows of each class in `order` (a seeded permutation), in that order: balanced, and shuffled
    rather than alternating (a strict alternation is a pattern a model continues instead of reading the row)."""
    counts: Counter = Counter()
    out = []
    for i in order:
        e = examples[i]
        if e.label in keys and counts[e.label] < k:
            out.append(e)
            counts[e.label] += 1
    for key in keys:
        if counts[key] < k:
            raise DataError(f"class {key!r} has only {counts[key]} rows left for {k} demonstrations per class "
                            "(lower demos)", "demos")
    return out


def file_fingerprint(path: str | Path) -> str:
    from .fileio import sha256_file

    return f"hf:{str(path)[3:]}" if str(path).startswith("hf:") else sha256_file(path)


@dataclass(frozen=True)
class DataSpec:
    """Where a run's rows come from: a pool to k-shot sample (`data`), or explicit split files."""

    data: str | None = setting(None, "Labelled pool (CSV/TSV/JSONL or hf:NAME) to draw k per class for train and dev "
                               "from.")
    train: str | None = setting(None, "Explicit training file, used whole (no sampling).", path=True)
    dev: str | None = setting(None, "Explicit dev file.", path=True)
    test: str | None = setting(None, "Test file, scored once at the end.", path=True)
    k_shot: int = setting(16, "Examples per class for train (and again for dev).")
    no_dev: bool = setting(False, "Tune on the dev rows too: the k per class drawn for dev from --data join train, "
                           "and there is no dev set, so nothing compares the tuned prompt with the plain template.")
    seed: int = 42  # the run's seed: its sampling stream draws the k-shot split

    def check(self) -> None:
        if self.data and self.train:
            raise SettingsError("give data (k-shot sampled) or train (used whole), not both", ("data", "train"))
        if self.no_dev and not self.data:
            raise SettingsError("no_dev moves the dev rows drawn from data into train; a train file is used whole "
                                "(give no dev file to tune without one)", ("no_dev", "train"))
        if self.no_dev and self.dev:
            raise SettingsError("no_dev means no dev set: drop the dev file, or no_dev", ("no_dev", "dev"))
        if not (self.data or self.train):
            raise SettingsError("no training rows: give data FILE to sample k per class, or train FILE",
                                ("data", "train"))
        if isinstance(self.k_shot, bool) or not isinstance(self.k_shot, int) or self.k_shot < 1:
            raise SettingsError(f"k_shot must be at least 1, got {self.k_shot!r}", "k_shot")

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    dev: list[Example] | None
    test: list[Example] | None
    fingerprints: dict[str, str]
    demos: list[Example] = field(default_factory=list)  # drawn with `demos`, apart from train and dev


def load_splits(spec: DataSpec, keys: Sequence[str], demos: int = 0) -> Splits:
    """Train/dev/test rows as the reference forms them; every label checked against the task. With `demos`, that
    many rows per class as demonstrations, drawn with the same sampling stream after train and dev: from the rest
    of the pool, or from an explicit train file, which then loses them (a row never sees itself)."""
    from .seeding import generator

    spec.check()
    sources = {"data": spec.data, "train": spec.train, "dev": spec.dev, "test": spec.test}
    loaded = {name: read_examples(src) for name, src in sources.items() if src}
    for name, rows in loaded.items():
        check_labels(rows, keys, f"{name} {sources[name]}", name)
    rng = generator(spec.seed, "sampling")
    if spec.data:
        train, dev = k_shot_split(loaded["data"], keys, spec.k_shot, rng, with_dev=not spec.dev)
        dev = loaded.get("dev", dev)
        if spec.no_dev:  # the same draw, its dev rows tuned on too
            train, dev = train + dev, None
        taken = {id(e) for e in train + (dev if dev and not spec.dev else [])}
        pool = [e for e in loaded["data"] if id(e) not in taken]
    else:
        train, dev = loaded["train"], loaded.get("dev")
        pool = train
    drawn = per_class(pool, keys, demos, rng.permutation(len(pool))) if demos else []
    if drawn and not spec.data:
        shown = {id(e) for e in drawn}
        train = [e for e in train if id(e) not in shown]
        if not train:
            raise DataError(f"the train file's rows all became demonstrations; lower demos below "
                            f"{demos}", "demos")
    test = loaded.get("test")
    if test is None and spec.data and spec.data.startswith("hf:"):
        test = hf_test_split(spec.data)
        check_labels(test, keys, f"{spec.data} (evaluation split)")
    fingerprints = {name: file_fingerprint(src) for name, src in sources.items() if src}
    return Splits(train, dev or None, test, fingerprints, drawn)
