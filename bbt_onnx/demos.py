"""Demonstrations (in-context learning) as a command names them: K per class, from the user's file or, in a tune,
from the training pool. The demonstrations themselves live in the task (`Task.demonstrations`), so a run's result
carries them to evaluate, predict, check, serve and deploy."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from .data import Example, check_labels, per_class, read_examples
from .errors import SettingsError
from .options import setting
from .seeding import generator
from .tasks import Demonstration, Task


def as_demonstrations(rows: Sequence[Example]) -> tuple[Demonstration, ...]:
    return tuple(Demonstration(e.text, e.label, e.text_b) for e in rows)


@dataclass(frozen=True)
class DemoSpec:
    """Which demonstrations every row sees first."""

    demos: int | None = setting(None, "Demonstrations per class shown before every row (in-context learning), "
                                "balanced, in a seeded random order. tune draws them with its sampling stream from the "
                                "pool after train and dev (from --train, which then loses them: a row never sees "
                                "itself); elsewhere they are drawn from --demos-file. On a decoder exported with "
                                "--kv-cache they are computed once; on a masked LM they are text in every row.",
                                minimum=1)
    demos_file: str | None = setting(None, "Labelled rows (CSV/TSV/JSONL) to show as demonstrations, in the file's "
                                     "order (with --demos, K per class of them).", path=True)

    def __post_init__(self):
        if self.demos is not None and (isinstance(self.demos, bool) or not isinstance(self.demos, int)
                                       or self.demos < 1):
            raise SettingsError(f"demos must be a whole number of at least 1, got {self.demos!r}", "demos")

    @property
    def given(self) -> bool:
        return self.demos is not None or self.demos_file is not None

    @property
    def from_pool(self) -> int:
        """Demonstrations per class a tune draws from its own training pool (0: none, or they come from a file)."""
        return (self.demos or 0) if self.demos_file is None else 0

    def to_json(self) -> dict:
        return {"demos": self.demos, "demos_file": self.demos_file}

    @classmethod
    def from_json(cls, raw: dict | None) -> "DemoSpec":
        raw = raw or {}
        return cls(raw.get("demos"), raw.get("demos_file"))

    def apply(self, task: Task, seed: int = 0, pool: bool = False) -> Task:
        """`task` with the file's demonstrations (K per class drawn with `seed`'s sampling stream when `demos` is
        given). A K without a file is a tune's, drawn from its pool (`pool`); anywhere else it is refused."""
        if not self.given:
            return task
        if self.demos_file is None:
            if not pool:
                raise SettingsError("demos draws its demonstrations from demos_file here (only tune draws them "
                                    "from its training rows)", ("demos", "demos_file"))
            return task
        rows = read_examples(self.demos_file)
        check_labels(rows, task.label_keys, f"demos_file {self.demos_file}", "demos_file")
        if self.demos:
            rows = per_class(rows, task.label_keys, self.demos, generator(seed, "sampling").permutation(len(rows)))
        return replace(task, demonstrations=as_demonstrations(rows))


def without_demonstrations(rows: Sequence[Example], task: Task) -> list[Example]:
    """The rows that are not one of the task's demonstrations (a row never sees itself)."""
    shown = {(d.text, d.text_b) for d in task.demonstrations}
    return [e for e in rows if (e.text, e.text_b) not in shown]


def refuse_with_run(spec: DemoSpec, result) -> None:
    """A run's result brings its own demonstrations: naming others beside it is a mistake."""
    if spec.given and result is not None:
        have = len(result.task.demonstrations)
        raise SettingsError(f"demos and demos_file come from the run (it has {have} demonstrations); drop them",
                            ("demos", "demos_file"))
