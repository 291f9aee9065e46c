"""Tasks: a template, a verbalizer (label -> word) and a metric.

The presets copy the reference implementation (txsun1997/Black-Box-Tuning): its
templates put the soft prompt first, then ` . `; label keys are the datasets' own
integer labels.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import SettingsError
from .fileio import JSON_LIMIT, read_text_bounded
from .kinds import SENTIMENT, LmKind
from .options import setting

FIELDS = ("text", "text_b", "mask")
METRICS = ("accuracy", "f1")
BOS_CHOICES = ("auto", "always", "never")  # auto: as the model's tokenizer does
POSITIONS = ("prefix", "suffix")
FRAMING_KEYS = (("bos", "bos"), ("chat", "chat"), ("prompt_position", "position"))  # JSON key, Framing field

MAX_TEMPLATE_CHARS = 100_000  # about 20,000 tokens: past every model's positions, far under a row's limit
MAX_DEMONSTRATIONS = 1024  # far past what any model's positions hold
MAX_CLASS_WORDS = 64  # words that count for one class: a readout, not a vocabulary


@dataclass(frozen=True)
class Framing:
    """What goes around the filled template on a decoder, recorded with the task so that prompts reproduce.

    `bos`: put the BOS token first as the tokenizer does (auto), always, or never. `chat`: wrap the template in
    the model's chat template (the text in the user turn, the answer cue opening the assistant turn).
    `position`: the prompt slots before the template (prefix) or right after the text, before the answer cue
    (suffix), where every text token is independent of the prompt and its keys and values can be cached.
    """

    bos: str = "auto"
    chat: bool = False
    position: str = "prefix"

    def __post_init__(self):
        if self.bos not in BOS_CHOICES:
            raise SettingsError(f"bos {self.bos!r} is not one of {', '.join(BOS_CHOICES)}", "bos")
        if self.position not in POSITIONS:
            raise SettingsError(f"position {self.position!r} is not one of {', '.join(POSITIONS)}", "position")
        if not isinstance(self.chat, bool):
            raise SettingsError(f"chat must be true or false, got {self.chat!r}", "chat")

    def to_json(self) -> dict:
        """Only what differs from the defaults, so tasks written before framing existed read back equal."""
        default = Framing()
        return {key: getattr(self, attr) for key, attr in FRAMING_KEYS if getattr(self, attr) != getattr(default, attr)}

    @classmethod
    def from_json(cls, raw: dict) -> "Framing":
        return make_framing(raw.get("bos"), raw.get("chat"), raw.get("prompt_position"))


def make_framing(bos: str | None = None, chat: bool | None = None, position: str | None = None,
                 base: "Framing" = Framing()) -> Framing:
    """`base` with the given values replaced, each checked."""
    return Framing(base.bos if bos is None else bos, base.chat if chat is None else chat,
                   base.position if position is None else position)


def template_fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise SettingsError(f"template {template!r} is malformed: {exc} (write a literal brace as {{{{ or }}}})",
                            "template") from None


def label_pairs(labels) -> tuple[tuple[str, str], ...]:
    """(name, word) pairs from pairs or a {name: word} dict; anything else is a SettingsError."""
    if isinstance(labels, dict):
        labels = list(labels.items())
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple)):
        raise SettingsError(f"labels must be (name, word) pairs or a {{name: word}} dict, got {labels!r}"[:200],
                            "labels")
    pairs = []
    for item in labels:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(isinstance(v, (str, int)) for v in item) \
                or any(isinstance(v, bool) for v in item):
            raise SettingsError(f"labels must be (name, word) pairs or a {{name: word}} dict; {item!r} is not a pair"
                                [:200], "labels")
        pairs.append((str(item[0]), str(item[1])))
    return tuple(pairs)


@dataclass(frozen=True)
class Demonstration:
    """One answered example shown before every row (in-context learning): the template filled with its text and
    answered with its label's word."""

    text: str
    label: str
    text_b: str | None = None

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text.strip():
            raise SettingsError("a demonstration needs a non-empty text", "demonstrations")
        if not isinstance(self.label, str) or not self.label:
            raise SettingsError(f"demonstration {self.text[:40]!r} has no label", "demonstrations")
        if self.text_b is not None and not isinstance(self.text_b, str):
            raise SettingsError(f"demonstration {self.text[:40]!r}: text_b must be a string", "demonstrations")

    def to_json(self) -> dict:
        return {"text": self.text, "label": self.label, **({} if self.text_b is None else {"text_b": self.text_b})}

    @classmethod
    def from_json(cls, raw) -> "Demonstration":
        if not isinstance(raw, dict):
            raise SettingsError(f"a demonstration must be an object with text and label, got {raw!r}"[:200],
                                "demonstrations")
        return cls(raw.get("text"), None if raw.get("label") is None else str(raw["label"]), raw.get("text_b"))


@dataclass(frozen=True)
class Task:
    """What the model is asked, and how its answer is read.

    `template` holds `{text}`, optionally `{text_b}`, and `{mask}` where the label word
    goes; it is tokenized as written, right after the prompt slots. `labels` pairs the
    data's label values with the verbalizer words, in class order (a dict {name: word} is
    taken too). For `f1` the second label is the positive class. `demonstrations` are answered
    examples every row sees first (in-context learning). `extra_words` are, per class, more words
    that count for it beside its label word (a multi-word verbalizer: a class then scores the log
    of its words' summed probability). A task that cannot work is refused when it is built
    (SettingsError).
    """

    name: str = "custom"
    template: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    metric: str = "accuracy"
    framing: Framing = Framing()
    demonstrations: tuple[Demonstration, ...] = ()
    extra_words: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SettingsError(f"name must be a non-empty string, got {self.name!r}", "name")
        if not isinstance(self.template, str) or not self.template.strip():
            raise SettingsError("template is empty: write where the text goes, e.g. \" {text} It was {mask} .\"",
                                "template")
        if len(self.template) > MAX_TEMPLATE_CHARS:  # before anything reads it: no model has positions for more
            raise SettingsError(f"template holds {len(self.template):,} characters, more than the "
                                f"{MAX_TEMPLATE_CHARS:,} a template may hold", "template")
        template_fields(self.template)
        object.__setattr__(self, "labels", label_pairs(self.labels))
        labels = self.labels
        if len(labels) < 2:
            raise SettingsError("labels: a task needs at least two (name, word) pairs", "labels")
        keys = [k for k, _ in labels]
        if len(set(keys)) != len(keys):
            raise SettingsError(f"labels: names repeat: {', '.join(keys)}", "labels")
        if any(not k or not w.strip() for k, w in labels):
            raise SettingsError("labels: every label needs a name and a non-empty word (name=word)", "labels")
        if self.metric not in METRICS:
            raise SettingsError(f"metric {self.metric!r} is not one of {', '.join(METRICS)}", "metric")
        if self.metric == "f1" and len(labels) != 2:
            raise SettingsError("metric f1 is defined here for two labels (the second is the positive class)",
                                "metric")
        if not isinstance(self.framing, Framing):
            raise SettingsError(f"framing must be a Framing, got {type(self.framing).__name__}", "framing")
        self._check_demonstrations()
        self._check_extra_words()

    def _check_extra_words(self) -> None:
        extra = self.extra_words
        if isinstance(extra, (str, bytes, dict)) or not isinstance(extra, (list, tuple)):
            raise SettingsError("extra_words must be a list with one list of words per class", "extra_words")
        if not extra:
            object.__setattr__(self, "extra_words", ())
            return
        if len(extra) != len(self.labels):
            raise SettingsError(f"extra_words holds {len(extra)} lists for {len(self.labels)} classes; give one "
                                "(possibly empty) per class, in class order", "extra_words")
        out, seen = [], {w.strip() for w in self.label_words}
        for key, words in zip(self.label_keys, extra):
            if isinstance(words, (str, bytes)) or not isinstance(words, (list, tuple)):
                raise SettingsError(f"extra_words for {key!r} must be a list of words", "extra_words")
            if len(words) > MAX_CLASS_WORDS:
                raise SettingsError(f"extra_words for {key!r} holds {len(words)} words; a class takes at most "
                                    f"{MAX_CLASS_WORDS}", "extra_words")
            for word in words:
                if not isinstance(word, str) or not word.strip() or len(word) > 100:
                    raise SettingsError(f"extra_words for {key!r}: {word!r} is not a word", "extra_words")
                if word.strip() in seen:
                    raise SettingsError(f"extra_words: {word.strip()!r} counts for two classes, or is a label "
                                        "word already", "extra_words")
                seen.add(word.strip())
            out.append(tuple(words))
        object.__setattr__(self, "extra_words", tuple(out) if any(out) else ())

    def _check_demonstrations(self) -> None:
        demos = self.demonstrations
        if isinstance(demos, (str, bytes, dict)) or not isinstance(demos, (list, tuple)):
            raise SettingsError("demonstrations must be a list", "demonstrations")
        object.__setattr__(self, "demonstrations", demos := tuple(demos))
        if len(demos) > MAX_DEMONSTRATIONS:
            raise SettingsError(f"{len(demos)} demonstrations; a task holds at most {MAX_DEMONSTRATIONS}",
                                "demonstrations")
        chars = 0
        for demo in demos:
            if not isinstance(demo, Demonstration):
                raise SettingsError(f"demonstrations must be Demonstration records, got {type(demo).__name__}",
                                    "demonstrations")
            if demo.label not in self.label_keys:
                raise SettingsError(f"demonstration {demo.text[:40]!r} has label {demo.label!r}, which the task does "
                                    f"not know (its labels: {', '.join(self.label_keys)})", "demonstrations")
            chars += len(demo.text) + len(demo.text_b or "")
        if chars > 10 * MAX_TEMPLATE_CHARS:
            raise SettingsError(f"the demonstrations hold {chars:,} characters, more than the "
                                f"{10 * MAX_TEMPLATE_CHARS:,} any model's positions could take", "demonstrations")

    def without_demonstrations(self) -> "Task":
        return replace(self, demonstrations=())

    def with_extra_words(self, extra: tuple[tuple[str, ...], ...] = ()) -> "Task":
        return replace(self, extra_words=extra)

    @property
    def class_words(self) -> tuple[tuple[str, ...], ...]:
        """Each class's words, its label word first."""
        extra = self.extra_words or ((),) * len(self.labels)
        return tuple((word, *more) for word, more in zip(self.label_words, extra))

    @property
    def label_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.labels)

    @property
    def label_words(self) -> tuple[str, ...]:
        return tuple(w for _, w in self.labels)

    @property
    def uses_text_b(self) -> bool:
        return "text_b" in template_fields(self.template)

    def class_index(self, label: str) -> int:
        try:
            return self.label_keys.index(label)
        except ValueError:
            raise KeyError(label) from None

    def to_json(self) -> dict:
        demos = {"demonstrations": [d.to_json() for d in self.demonstrations]} if self.demonstrations else {}
        extra = {"extra_words": [list(w) for w in self.extra_words]} if self.extra_words else {}
        return {"name": self.name, "template": self.template, "labels": [list(p) for p in self.labels],
                "metric": self.metric, **self.framing.to_json(), **demos, **extra}

    @classmethod
    def from_json(cls, raw: dict) -> "Task":
        demos = raw.get("demonstrations") or []
        if not isinstance(demos, list):
            raise SettingsError("demonstrations must be a list of {text, label} objects", "demonstrations")
        return Task(str(raw.get("name", "custom")), str(raw["template"]), label_pairs(raw["labels"]),
                    str(raw.get("metric", "accuracy")), Framing.from_json(raw),
                    tuple(Demonstration.from_json(d) for d in demos), _word_lists(raw.get("extra_words")))


def _word_lists(raw) -> tuple[tuple[str, ...], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(w, list) for w in raw):
        raise SettingsError("extra_words must be a list with one list of words per class", "extra_words")
    return tuple(tuple(w) for w in raw)


def _pairs(words: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple((str(i), w) for i, w in enumerate(words))


PAIR = " . {text} ? {mask} , {text_b}"

PRESETS: dict[str, Task] = {
    "sst2": Task("sst2", SENTIMENT, _pairs(["bad", "great"])),
    "yelpp": Task("yelpp", SENTIMENT, _pairs(["bad", "great"])),
    "agnews": Task("agnews", " . {mask} News: {text}", _pairs(["World", "Sports", "Business", "Tech"])),
    "dbpedia": Task("dbpedia", " [ Category: {mask} ] {text}", _pairs([
        "Company", "Education", "Artist", "Athlete", "Office", "Transportation", "Building",
        "Natural", "Village", "Animal", "Plant", "Album", "Film", "Written"])),
    "mrpc": Task("mrpc", PAIR, _pairs(["No", "Yes"]), metric="f1"),
    "rte": Task("rte", PAIR, _pairs(["Yes", "No"])),
    "snli": Task("snli", PAIR, _pairs(["Yes", "Maybe", "No"])),
}


def check_template(template: str, kind: LmKind) -> None:
    """Reject templates the encoder could not fill: each problem is a user mistake."""
    fields = template_fields(template)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise SettingsError(f"template has unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                       "use {text}, {text_b} and {mask}")
    if "text" not in fields:
        raise SettingsError("template has no {text} placeholder: it must say where the input text goes")
    for f in FIELDS:
        if fields.count(f) > 1:
            raise SettingsError(f"template uses {{{f}}} more than once")
    kind.check_mask(template, fields)


def make_task(name: str, template: str, labels: tuple[tuple[str, str], ...], metric: str = "accuracy",
              framing: Framing = Framing()) -> Task:
    return Task(name, template, labels, metric, framing)


def parse_labels(spec: str) -> tuple[tuple[str, str], ...]:
    """`negative=bad,positive=great` -> (("negative", "bad"), ("positive", "great"))."""
    pairs = []
    for item in spec.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise SettingsError(f"labels item {item!r} is not name=word (e.g. negative=bad,positive=great)", "labels")
        key, word = item.split("=", 1)
        pairs.append((key.strip(), word.rstrip()))  # a leading space is the word's own, as the README says
    return tuple(pairs)


def load_task_file(path: str | Path) -> Task:
    path = Path(path)
    try:
        raw = json.loads(read_text_bounded(path, JSON_LIMIT))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SettingsError(f"cannot read task file {path}: {exc}", "task_file") from None
    if not isinstance(raw, dict) or "template" not in raw or "labels" not in raw:
        raise SettingsError(f"task file {path} needs an object with \"template\" and \"labels\" "
                       '(e.g. {"template": " {text} It was {mask} .", "labels": {"neg": "bad", "pos": "great"}})')
    try:
        return Task.from_json({"name": path.stem, **raw})
    except (TypeError, ValueError, AttributeError) as exc:
        raise SettingsError(f"task file {path}: {exc}") from None


def resolve_task(name: str | None = None, template: str | None = None, labels: str | None = None,
                 task_file: str | Path | None = None, metric: str | None = None, bos: str | None = None,
                 chat: bool | None = None, position: str | None = None) -> Task:
    """One task from the CLI's three ways of naming it: a preset, flags, or a file; `bos`, `chat` and
    `position` override the framing (a task file may set its own)."""
    task = _named_task(name, template, labels, task_file, metric)
    return replace(task, framing=make_framing(bos, chat, position, task.framing))


def _named_task(name, template, labels, task_file, metric) -> Task:
    if task_file is not None:
        if name or template or labels:
            raise SettingsError("task_file cannot be combined with name, template or labels",
                                ("task_file", "name", "template", "labels"))
        task = load_task_file(task_file)
        return replace(task, metric=metric or task.metric)  # the file's framing and demonstrations too
    if name is not None:
        if name not in PRESETS:
            raise SettingsError(f"unknown task {name!r}; presets: {', '.join(PRESETS)} "
                           "(or give template and labels, or task_file)", ("template", "labels", "task_file"))
        base = PRESETS[name]
        return make_task(base.name, template or base.template,
                         parse_labels(labels) if labels else base.labels, metric or base.metric)
    if template is None or labels is None:
        raise SettingsError("say what the task is: name (a preset), or template and labels, or task_file",
                            ("name", "template", "labels", "task_file"))
    return make_task("custom", template, parse_labels(labels), metric or "accuracy")


@dataclass(frozen=True)
class TaskSpec:
    """A task as a command names it: a preset, flags, or a file, with the framing overridden or not."""

    name: str | None = setting(None, "Preset: " + ", ".join(PRESETS) + ".", flag="--task")
    template: str | None = setting(None, 'Custom template with {text}, {text_b}, {mask}, e.g. " {text} It was {mask} ."')
    labels: str | None = setting(None, "Custom verbalizer: name=word,... in class order, e.g. neg=bad,pos=great.")
    task_file: str | None = setting(None, "JSON with template, labels, metric (and optionally the framing, "
                                    "demonstrations and extra_words).", path=True)
    metric: str | None = setting(None, "Override the task's metric.", choices=METRICS)
    bos: str | None = setting(None, "Decoders: BOS first as the tokenizer (or chat template) does, always, or never "
                              "[default: the task's, else auto].", choices=BOS_CHOICES)
    chat: bool | None = setting(None, "Decoders: wrap the template in the model's chat template [default: the "
                                "task's, else no].", flag="--chat/--no-chat")
    prompt_position: str | None = setting(None, "Decoders: prompt slots before the template (prefix) or after the "
                                          "text, before the answer cue (suffix, whose text is computed once with a "
                                          "--kv-cache export) [default: the task's, else prefix].", choices=POSITIONS)

    @property
    def given(self) -> bool:
        return any(v is not None for v in self.__dict__.values())

    def resolve(self) -> Task:
        return resolve_task(self.name, self.template, self.labels, self.task_file, self.metric, self.bos, self.chat,
                            self.prompt_position)
