"""Template filling and tokenisation into the graph's inputs, with `tokenizers` alone.

Each row becomes `[bos] + P' placeholder ids + template tokens (+ [eos] for masked LMs)`.
The filled template is tokenized as one string, exactly as the model would see it; the
tokens that came from the text fields are then known by their character offsets, so
truncation cuts text only, never the template, the prompt slots or the mask.

Decoders may frame it (tasks.Framing): BOS or not, the model's chat template around it, and
the slots after the text instead (suffix). Then the row is tokenized in two pieces, the one
before the slots and the one after, each as one string.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from .data import Example, check_labels
from .errors import DataError, ModelError, SettingsError
from .manifest import Manifest
from .tasks import Demonstration, Framing, Task, check_template
from .truncation import truncation_plan


@dataclass(frozen=True)
class EncodedSet:
    """N encoded rows, right-padded to the longest: the graph inputs bar the prompt.

    With `prefix_ids`, every row is those ids (a prefix the rows share: demonstrations, with BOS first when the
    framing has one) and then its own ids; every field but `prefix_ids` describes the rows' own ids, and positions
    (mask_pos, prompt_pos) count from a row's own first id. `whole()` is the same rows in one piece."""

    input_ids: np.ndarray  # int64 [N, T]
    attention_mask: np.ndarray  # int64 [N, T]
    mask_pos: np.ndarray  # int64 [N]
    labels: np.ndarray  # int64 [N], class index, -1 when unknown
    label_ids: np.ndarray  # int64 [W]: every word the readout reads, in class order
    truncated: int = 0  # rows whose text was cut to fit
    prompt_pos: np.ndarray | None = None  # int64 [N]: each row's first prompt slot; None: right after BOS
    prefix_ids: np.ndarray | None = None  # int64 [S_p]: ids every row shares before its own; None: no prefix
    label_groups: np.ndarray | None = None  # int64 [W]: the class each word counts for; None: one word a class

    @property
    def classes(self) -> int:
        """K, the classes the readout scores (the label ids' count when each class has one word)."""
        return len(self.label_ids) if self.label_groups is None else int(self.label_groups.max()) + 1

    @property
    def suffix_tail(self) -> int | None:
        """Tokens from the first prompt slot to the end when every row has the same number (a suffix prompt's
        slots and answer cue): everything before them is then independent of the prompt; None otherwise."""
        if self.prompt_pos is None or not len(self):
            return None
        tails = self.lengths - self.prompt_pos
        return int(tails[0]) if (tails == tails[0]).all() and (self.mask_pos >= self.prompt_pos).all() else None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(axis=1)

    def take(self, index: np.ndarray) -> "EncodedSet":
        """Rows `index`, with padding trimmed to their own longest row."""
        width = int(self.lengths[index].max()) if len(index) else 0
        return replace(self, input_ids=self.input_ids[index, :width], attention_mask=self.attention_mask[index, :width],
                       mask_pos=self.mask_pos[index], labels=self.labels[index], truncated=0,
                       prompt_pos=None if self.prompt_pos is None else self.prompt_pos[index])

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_ids is None else int(np.size(self.prefix_ids))

    def whole(self) -> "EncodedSet":
        """The rows with the shared prefix put before each (positions shifted past it): what runs where nothing
        caches the prefix (a masked LM, an engine without the cached pair). Rows without a prefix are returned
        as they are; `prompt_pos` None (right after BOS) stays None, the slots then lie in the prefix."""
        if self.prefix_ids is None:
            return self
        prefix = np.asarray(self.prefix_ids, dtype=np.int64).reshape(-1)
        n, s = len(self), prefix.size
        return replace(self, input_ids=np.concatenate([np.broadcast_to(prefix, (n, s)), self.input_ids], axis=1),
                       attention_mask=np.concatenate([np.ones((n, s), np.int64), self.attention_mask], axis=1),
                       mask_pos=self.mask_pos + s, prompt_pos=None if self.prompt_pos is None else self.prompt_pos + s,
                       prefix_ids=None)

    def join(self, other: "EncodedSet", pad_id: int) -> "EncodedSet":
        """These rows, then `other`'s (the same label words and shared prefix), right-padded with `pad_id` to the
        longer width."""
        width = max(self.input_ids.shape[1], other.input_ids.shape[1])

        def padded(a: np.ndarray, value: int) -> np.ndarray:
            return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)

        both = (self.prompt_pos is None) == (other.prompt_pos is None)
        same_prefix = (self.prefix_ids is None) == (other.prefix_ids is None) and \
            (self.prefix_ids is None or np.array_equal(self.prefix_ids, other.prefix_ids))
        same_readout = np.array_equal(self.label_ids, other.label_ids) and \
            (self.label_groups is None) == (other.label_groups is None) and \
            (self.label_groups is None or np.array_equal(self.label_groups, other.label_groups))
        if not both or not same_prefix or not same_readout:
            raise ValueError("rows of another framing or task cannot be joined")
        return EncodedSet(np.concatenate([padded(self.input_ids, pad_id), padded(other.input_ids, pad_id)]),
                          np.concatenate([padded(self.attention_mask, 0), padded(other.attention_mask, 0)]),
                          np.concatenate([self.mask_pos, other.mask_pos]), np.concatenate([self.labels, other.labels]),
                          self.label_ids, self.truncated + other.truncated,
                          None if self.prompt_pos is None else np.concatenate([self.prompt_pos, other.prompt_pos]),
                          self.prefix_ids, self.label_groups)

    def batches(self, rows: int) -> Iterator[tuple[np.ndarray, "EncodedSet"]]:
        """Length-sorted batches of at most `rows` rows, so little padding is computed."""
        order = np.argsort(self.lengths, kind="stable")
        for start in range(0, len(order), rows):
            idx = order[start:start + rows]
            yield idx, self.take(idx)


@dataclass(frozen=True)
class CacheSplit:
    """Suffix-prompt rows cut where the slots begin: the texts (right-padded) and the equal-length tails."""

    text_ids: np.ndarray  # int64 [N, S]
    text_mask: np.ndarray  # int64 [N, S]
    tail_ids: np.ndarray  # int64 [N, U]: the slots and the answer cue
    tail_mask_pos: np.ndarray  # int64 [N]: mask_pos within the tail


def cache_split(batch: EncodedSet) -> CacheSplit | None:
    """The split the cached pair of graphs takes, or None when the rows are not suffix-prompt rows."""
    tail = batch.suffix_tail
    if tail is None or not batch.prompt_pos.max() > 0:
        return None
    width = int(batch.prompt_pos.max())
    text_mask = (np.arange(width)[None, :] < batch.prompt_pos[:, None]).astype(np.int64)
    text_ids = np.where(text_mask == 1, batch.input_ids[:, :width], 0).astype(np.int64)
    tail_ids = np.take_along_axis(batch.input_ids, batch.prompt_pos[:, None] + np.arange(tail)[None, :], axis=1)
    return CacheSplit(text_ids, text_mask, np.ascontiguousarray(tail_ids),
                      (batch.mask_pos - batch.prompt_pos).astype(np.int64))


def load_tokenizer(manifest: Manifest) -> Tokenizer:
    path = manifest.tokenizer_path
    if not path.is_file():
        raise ModelError(f"{manifest.directory} has no tokenizer.json; re-export the model")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
        raise ModelError(f"cannot load {path}: {exc}") from None
    tok.no_truncation()
    tok.no_padding()
    check_vocabulary(manifest, tok)
    return tok


def check_vocabulary(manifest: Manifest, tok: Tokenizer) -> None:
    """Every id the tokenizer gives, and every special id of the manifest, is a row of the model's embeddings."""
    size = tok.get_vocab_size(with_added_tokens=False)  # added tokens appear only where written out
    where = manifest.directory / "manifest.json"
    if size > manifest.vocab_size:
        raise ModelError(f"{manifest.tokenizer_path} has {size} tokens, but vocab_size in {where} is "
                         f"{manifest.vocab_size}; re-export the model")
    for name in ("bos_id", "eos_id", "pad_id", "mask_id", "bos_token_id"):
        value = getattr(manifest, name)
        if value is not None and tok.id_to_token(value) is None:
            raise ModelError(f"{name} {value} in {where} is not a token of {manifest.tokenizer_path}; re-export "
                             "the model")


def label_token_ids(tokenizer: Tokenizer, words: Sequence[str], prefix: str) -> tuple[list[int], list[str]]:
    """The first piece of each label word, and a warning for each word that splits.

    A word that starts with a space is tokenized as written; otherwise `prefix` (the
    model's convention: none for masked LMs, as the reference does, a space for causal
    LMs) is put before it.
    """
    ids, warnings, owner = [], [], {}
    for word in words:
        piece_text = word if word.startswith(" ") else prefix + word
        enc = tokenizer.encode(piece_text, add_special_tokens=False)
        if not enc.ids:
            raise SettingsError(f"label word {word!r} produces no tokens")
        if len(enc.ids) > 1:
            warnings.append(f"label word {word!r} splits into {len(enc.ids)} pieces {enc.tokens}; "
                            f"using the first, {enc.tokens[0]!r}")
        first = enc.ids[0]
        if first in owner:
            raise SettingsError(f"label words {owner[first]!r} and {word!r} share their first piece "
                           f"{enc.tokens[0]!r}; choose words that differ there")
        owner[first] = word
        ids.append(first)
    return ids, warnings


def readout_ids(tokenizer: Tokenizer, task: Task, prefix: str) -> tuple[list[int], list[int] | None, list[str]]:
    """Every word the task's readout reads, as (ids in class order, the class of each or None when each class has
    its label word alone, warnings). The label words are read as `label_token_ids` reads them; a class's further
    words likewise, each id counted for one class only."""
    ids, warnings = label_token_ids(tokenizer, task.label_words, prefix)
    if not task.extra_words:
        return ids, None, warnings
    owner = {i: c for c, i in enumerate(ids)}
    flat, groups = [], []
    for c, (label_id, extra) in enumerate(zip(ids, task.extra_words)):
        flat.append(label_id)
        groups.append(c)
        more, notes = label_token_ids(tokenizer, extra, prefix) if extra else ([], [])
        warnings += notes
        for word, i in zip(extra, more):
            if owner.get(i, c) != c:
                raise SettingsError(f"extra word {word!r} reads the same token as a word of class "
                                    f"{task.label_keys[owner[i]]!r}; leave one out", "extra_words")
            if i not in owner:
                owner[i] = c
                flat.append(i)
                groups.append(c)
    return flat, groups, warnings


def init_placeholders(tokenizer: Tokenizer, text: str, prompt_tokens: int) -> list[int]:
    """Prompt slots holding the tokens of `text`, so z = 0 is exactly the template with `text` before it."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != prompt_tokens:
        raise SettingsError(f"prompt_init {text!r} is {len(ids)} tokens; pass prompt_tokens {len(ids)} with it",
                            ("prompt_init", "prompt_tokens"))
    return ids


DEMO_SEPARATORS = {True: " ", False: "\n\n"}  # between demonstrations, by whether the model is a masked LM


def demonstration_text(task: Task, demo: Demonstration, word: str, masked: bool, label_prefix: str) -> str:
    """The template filled with a demonstration's text and answered with `word`: where {mask} stands on a masked
    LM, after the answer cue on a decoder (as the label word is read: with the model's label prefix)."""
    out = []
    for literal, field, _, _ in string.Formatter().parse(task.template):
        out.append(literal)
        if field == "text":
            out.append(demo.text)
        elif field == "text_b":
            if demo.text_b is None:
                raise DataError(f"the template uses {{text_b}} but demonstration {demo.text[:40]!r} has no text_b")
            out.append(demo.text_b)
        elif field == "mask":
            out.append(word.strip() if masked else "")
    text = "".join(out)
    if masked:
        return text.strip()
    answer = word if word.startswith(" ") else label_prefix + word
    return text + (answer.lstrip() if text[-1:].isspace() else answer)


def demonstrations_block(task: Task, manifest: Manifest) -> str:
    """Every demonstration of the task, each followed by the separator: the text every row is preceded by."""
    masked = bool(manifest.lm.mask_token)
    words = dict(task.labels)
    return "".join(demonstration_text(task, d, words[d.label], masked, manifest.label_prefix) +
                   DEMO_SEPARATORS[masked] for d in task.demonstrations)


SLOTS = "@slots"  # the owner of the marker that stands for the prompt slots while a row is cut to fit


def check_framing(task: Task, manifest: Manifest) -> None:
    """A framing the model can honour; each refusal is a user mistake."""
    f = task.framing
    if not manifest.lm.framings:
        if f != Framing():
            raise SettingsError("the framing (bos, chat, prompt_position) is for decoders; a masked LM keeps the "
                                "reference's prompt right after <s>", ("bos", "chat", "prompt_position"))
        return
    if f.chat and not manifest.has_chat:
        raise SettingsError("chat needs the model's chat template, and this model directory has none (its "
                            "tokenizer ships none, or it was exported before chat templates were recorded: re-export)",
                            "chat")
    if f.bos == "always" and manifest.bos_token_id is None and manifest.bos_id is None:
        raise SettingsError("bos always: this model's tokenizer has no BOS token", "bos")


def bos_ids(task: Task, manifest: Manifest) -> list[int]:
    """The BOS the framing asks for: auto follows the tokenizer, or the chat template (which writes its own)."""
    bos = task.framing.bos
    if bos == "never" or (bos == "auto" and task.framing.chat):
        return []
    token = manifest.bos_id if bos == "auto" else next(i for i in (manifest.bos_token_id, manifest.bos_id)
                                                       if i is not None)
    return [] if token is None else [token]


def lstrip_parts(parts: list) -> list:
    """Template parts with the whitespace at their start removed: the chat markup brings its own."""
    if not parts:
        return parts
    literal, *rest = parts[0]
    return [(literal.lstrip(), *rest)] + parts[1:]


class Encoder:
    """Turns examples into an EncodedSet for one (model, task, prompt length)."""

    def __init__(self, tokenizer: Tokenizer, manifest: Manifest, task: Task, prompt_tokens: int,
                 max_length: int | None = None, placeholder_ids: Sequence[int] | None = None):
        check_template(task.template, manifest.lm)
        check_framing(task, manifest)
        if not 0 <= prompt_tokens <= manifest.prompt_tokens:
            raise SettingsError(f"prompt_tokens {prompt_tokens} is outside 0..{manifest.prompt_tokens}, "
                                "the most this model was exported for (re-export it with more prompt tokens)",
                                "prompt_tokens")
        if placeholder_ids is None:
            placeholder_ids = manifest.placeholder_ids[:prompt_tokens]
        elif len(placeholder_ids) != prompt_tokens:
            raise SettingsError(f"{len(placeholder_ids)} placeholder ids for {prompt_tokens} prompt tokens")
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.task = task
        self.prompt_tokens = prompt_tokens
        self.max_length = min(max_length or manifest.max_positions, manifest.max_positions)
        self.label_ids, self.label_groups, self.warnings = readout_ids(tokenizer, task, manifest.label_prefix)
        self.placeholder_ids = [int(i) for i in placeholder_ids]
        self.lead = bos_ids(task, manifest)
        self.tail = [manifest.eos_id] if manifest.appends_eos else []
        self.mask_text = tokenizer.id_to_token(manifest.mask_id) if manifest.lm.mask_token else ""
        # demonstrations: on a decoder a prefix the rows share (BOS, the chat template's opening, the
        # demonstrations), computed once with a --kv-cache export; on a masked LM, whose slots follow <s>, plain
        # text after the slots, before the template, in every row
        self.demos = demonstrations_block(task, manifest) if task.demonstrations else ""
        self.prefix_ids: list[int] = []
        if self.demos and manifest.lm.framings:
            opening = manifest.chat_prefix if task.framing.chat else ""
            self.prefix_ids = self.lead + tokenizer.encode(opening + self.demos, add_special_tokens=False).ids
            self.lead = []
            self.max_length = min(self.max_length, manifest.max_positions - len(self.prefix_ids))
            if self.max_length < len(self.placeholder_ids) + 2:
                raise SettingsError(f"the {len(task.demonstrations)} demonstrations take {len(self.prefix_ids)} "
                                    f"tokens of the model's {manifest.max_positions} positions, leaving no room for "
                                    "a row; use fewer demonstrations", "demos")
        self.before, self.after = self._pieces(list(string.Formatter().parse(task.template)))

    def _pieces(self, parts: list) -> tuple[list, list]:
        """The template parts before the prompt slots and after them."""
        framing = self.task.framing
        if self.demos and not self.prefix_ids:  # a masked LM: the demonstrations lead the template
            space = "" if parts[0][0][:1].isspace() else " "
            parts = [(self.demos.rstrip() + space, None, None, None)] + parts
        last = max(i for i, part in enumerate(parts) if part[1] in ("text", "text_b"))
        body, cue = parts[:last + 1], parts[last + 1:]
        opening = []
        if framing.chat:
            opening = [] if self.prefix_ids else [(self.manifest.chat_prefix, None, None, None)]  # else in the prefix
            body = opening + lstrip_parts(body)
            cue = [(self.manifest.chat_suffix, None, None, None)] + lstrip_parts(cue)
        if framing.position == "suffix":
            return body, cue
        if framing.chat:  # the slots open the user turn
            return body[:len(opening)], body[len(opening):] + cue
        return [], parts

    def _render(self, parts: list, ex: Example) -> tuple[str, dict[str, tuple[int, int]]]:
        out, spans = [], {}
        pos = 0
        for literal, field, _, _ in parts:
            out.append(literal)
            pos += len(literal)
            if field is None:
                continue
            if field == "mask":
                value = self.mask_text
            elif field == "text_b":
                if ex.text_b is None:
                    raise DataError("the template uses {text_b} but a row has no text_b/sentence2 column")
                value = ex.text_b
            else:
                value = ex.text
            spans[field] = (pos, pos + len(value))
            out.append(value)
            pos += len(value)
        return "".join(out), spans

    def _tokenize(self, parts: list, examples: Sequence[Example]) -> list[tuple[list[int], list[str | None]]]:
        if not parts:
            return [([], [])] * len(examples)
        rendered = [self._render(parts, e) for e in examples]
        encs = self.tokenizer.encode_batch([r[0] for r in rendered], add_special_tokens=False)
        return [self._own(enc, spans) for (_, spans), enc in zip(rendered, encs)]

    def encode(self, examples: Sequence[Example]) -> EncodedSet:
        if not examples:
            raise DataError("no rows to encode")
        rows, mask_pos, prompt_pos, truncated = [], [], [], 0
        fixed = len(self.lead) + len(self.placeholder_ids) + len(self.tail)
        pieces = zip(examples, self._tokenize(self.before, examples), self._tokenize(self.after, examples))
        for ex, left, right in pieces:
            ids, owner = left[0] + [-1] + right[0], left[1] + [SLOTS] + right[1]  # -1 marks where the slots go
            over = fixed + len(ids) - 1 - self.max_length
            if over > 0:
                ids, owner = self._truncate(ids, owner, over)
                truncated += 1
            cut = owner.index(SLOTS)
            row = self.lead + ids[:cut] + self.placeholder_ids + ids[cut + 1:] + self.tail
            owner = [None] * len(self.lead) + owner[:cut] + [SLOTS] * len(self.placeholder_ids) + owner[cut + 1:]
            if self.manifest.lm.mask_token:
                if "mask" not in owner:
                    text = self._render(self.after, ex)[0]
                    raise DataError(f"the mask token vanished while tokenizing {text[:80]!r}")
                mp = owner.index("mask")
            else:
                mp = len(row) - 1
            rows.append(row)
            mask_pos.append(mp)
            prompt_pos.append(len(self.lead) + cut)
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.manifest.pad_id, dtype=np.int64)
        attention = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = r
            attention[i, :len(r)] = 1
        check_labels([e for e in examples if e.label is not None], self.task.label_keys, "the input")
        labels = np.array([-1 if e.label is None else self.task.class_index(e.label) for e in examples], dtype=np.int64)
        return EncodedSet(input_ids, attention, np.array(mask_pos, dtype=np.int64), labels,
                          np.array(self.label_ids, dtype=np.int64), truncated, np.array(prompt_pos, dtype=np.int64),
                          np.array(self.prefix_ids, dtype=np.int64) if self.prefix_ids else None,
                          None if self.label_groups is None else np.array(self.label_groups, dtype=np.int64))

    @staticmethod
    def _own(enc, spans: dict[str, tuple[int, int]]) -> tuple[list[int], list[str | None]]:
        """Which field each token came from, by overlap of its characters with the field's span."""
        owner: list[str | None] = []
        for start, end in enc.offsets:
            who = None
            for field, (a, b) in spans.items():
                if start < b and end > a:
                    who = field
                    break
            owner.append(who)
        return list(enc.ids), owner

    def _truncate(self, ids: list[int], owner: list[str | None], over: int) -> tuple[list[int], list[str | None]]:
        """Drop `over` tokens from the ends of the text fields, longest field first, in one pass."""
        counts = {f: owner.count(f) for f in ("text", "text_b")}
        drop = truncation_plan(counts, over)
        if drop is None:
            limit = (f"{self.max_length} tokens" if self.max_length < self.manifest.max_positions
                     else f"the model's {self.max_length} positions")
            demos = f", the {len(self.task.demonstrations)} demonstrations" if self.demos else ""
            raise SettingsError(f"the template{demos} and {self.prompt_tokens} prompt tokens leave no room for text "
                                f"within {limit}; shorten the template, use fewer prompt tokens or a larger "
                                "max_length",
                                "max_length")
        keep = [True] * len(ids)
        for i in range(len(ids) - 1, -1, -1):
            field = owner[i]
            if drop.get(field, 0) > 0:
                keep[i] = False
                drop[field] -= 1
        return [t for t, k in zip(ids, keep) if k], [o for o, k in zip(owner, keep) if k]


def length_buckets(lengths: np.ndarray, max_buckets: int = 4, min_saving: float = 0.1) -> list[np.ndarray]:
    """Split rows into at most `max_buckets` groups of similar length, minimising padded tokens.

    Rows are sorted by length and cut into contiguous runs by dynamic programming. Returns
    the row indices of each group: a single group with every row unless splitting saves at
    least `min_saving` of the padded tokens of one call, and no more groups than it takes to
    come within 5% of the fewest padded tokens.
    """
    order = np.argsort(lengths, kind="stable")
    sorted_len = np.asarray(lengths)[order].astype(np.int64)
    n = len(order)
    groups = max(1, min(max_buckets, n))
    # cost[b, j]: fewest padded tokens for the j shortest rows in b groups; start[b, j]: where the last group begins
    cost = np.full((groups + 1, n + 1), np.iinfo(np.int64).max // 2, dtype=np.int64)
    start = np.zeros((groups + 1, n + 1), dtype=np.int64)
    cost[0, 0] = 0
    for b in range(1, groups + 1):
        for j in range(b, n + 1):
            i = np.arange(b - 1, j)
            total = cost[b - 1, i] + (j - i) * sorted_len[j - 1]
            k = int(np.argmin(total))
            cost[b, j], start[b, j] = total[k], i[k]
    fewest = cost[1:, n].min()
    b = int(np.argmax(cost[1:, n] <= 1.05 * fewest)) + 1
    if cost[1, n] - cost[b, n] < min_saving * cost[1, n]:
        return [order]
    cuts, j = [n], n
    for level in range(b, 0, -1):
        j = int(start[level, j])
        cuts.append(j)
    cuts.reverse()
    return [order[a:c] for a, c in zip(cuts[:-1], cuts[1:])]
