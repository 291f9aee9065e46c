"""What every engine is and shares: the protocol the tuner calls, the prompt checks done before scoring, and how
rows are split into calls, so that every backend runs the very tensors the in-process engine would."""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np

from ..contract import PROMPT_POS
from ..encoding import EncodedSet, length_buckets
from ..errors import ModelError, PromptError
from ..losses import class_scores
from ..manifest import Manifest


@runtime_checkable
class Engine(Protocol):
    """The forward-only service the tuner queries. `deep`: opened on the deep-prompt graph (BBTv2), so that
    `deep_label_logits` scores; `precision`: the graph's (fp32, fp16, int8). The graph reads the logits of the
    batch's `label_ids`; with `label_groups` (several words a class) the engine hands back each class's
    log-sum-exp of its words (`losses.class_scores`), so K below is the batch's `classes`."""

    provider: str
    precision: str
    deep: bool

    def label_logits(self, prompt_embeds: np.ndarray, batch: EncodedSet) -> np.ndarray:
        """[C, P', H] prompts x N rows -> [C, N, K] float32 logits of the label words."""
        ...

    def deep_label_logits(self, prompt_embeds: np.ndarray, batch: EncodedSet, layer_prompts: np.ndarray,
                          layer: int) -> np.ndarray:
        """C candidates [C, P', H] for layer `layer`, every other layer at `layer_prompts` [L, P', H]
        -> [C, N, K] float32 logits of the label words."""
        ...


def score_rows(score: Callable[[EncodedSet], np.ndarray], rows: EncodedSet, batch_rows: int,
               on_batch=None) -> np.ndarray:
    """[N, K] label logits of one prompt on every row, in the rows' order, scored in length-sorted batches of
    `batch_rows`; `score(batch)` gives [1, n, K] for a batch, and `on_batch(rows)` hears of each batch done."""
    out = np.empty((len(rows), rows.classes), np.float32)
    for idx, batch in rows.batches(batch_rows):
        out[idx] = score(batch)[0]
        if on_batch:
            on_batch(len(idx))
    return out


def row_groups(batch: EncodedSet, lengths: np.ndarray, max_buckets: int) -> tuple[list[np.ndarray], list[EncodedSet]]:
    """How a batch is split into calls: rows of similar `lengths` together, at most `max_buckets` calls; one
    group keeps the batch as it is, in its own order."""
    groups = length_buckets(lengths, max_buckets)
    if len(groups) == 1:
        return [np.arange(len(batch))], [batch]
    return groups, [batch.take(g) for g in groups]


def row_input(batch: EncodedSet, name: str, prompt_start: int) -> np.ndarray:
    """One per-row input of the graph; rows encoded before prompt positions existed put the prompt after BOS."""
    if name == PROMPT_POS and batch.prompt_pos is None:
        return np.full(len(batch), prompt_start, np.int64)
    return getattr(batch, name)


def check_prompt_positions(batch: EncodedSet, takes_prompt_pos: bool, prompt_start: int, graph: str) -> None:
    if takes_prompt_pos or batch.prompt_pos is None or (batch.prompt_pos == prompt_start).all():
        return
    raise ModelError(f"the {graph} graph puts the prompt right after BOS only, and these rows have it "
                     "elsewhere (bos, chat or prompt_position suffix); re-export the model",
                     ("bos", "chat", "prompt_position"))


class PromptScoring:
    """What every engine does with prompts before its own `_score(prompts, batch, extra)`: shapes checked, and on
    the deep graph a plain prompt scored as layer 0's with no prompt on the other layers. A subclass sets `deep`,
    `manifest`, `prompt_dtype`, `graph_label`, and `LAYER_SHAPE` (how prompt_layer travels)."""

    LAYER_SHAPE: tuple[int, ...] = (1,)  # prompt_layer's shape
    manifest: Manifest
    deep: bool
    graph_label: str
    prompt_dtype: type

    def label_logits(self, prompt_embeds: np.ndarray, batch: EncodedSet) -> np.ndarray:
        if self.deep:
            zeros = np.zeros((self.manifest.num_layers, *np.shape(prompt_embeds)[1:]), self.prompt_dtype)
            return self.deep_label_logits(prompt_embeds, batch, zeros, 0)
        return class_scores(self._score(self._prompts(prompt_embeds), batch, {}), batch.label_groups)

    def deep_label_logits(self, prompt_embeds: np.ndarray, batch: EncodedSet, layer_prompts: np.ndarray,
                          layer: int) -> np.ndarray:
        if not self.deep:
            raise ModelError(f"{self.graph_label} takes no deep prompts; open the engine with deep=True")
        prompts = self._prompts(prompt_embeds)
        layers = np.ascontiguousarray(layer_prompts, dtype=self.prompt_dtype)
        if layers.shape != (self.manifest.num_layers, *prompts.shape[1:]):
            raise PromptError(f"layer_prompts must be [{self.manifest.num_layers}, {prompts.shape[1]}, "
                              f"{self.manifest.hidden_size}], got {list(layers.shape)}", "layer_prompts")
        if not 0 <= layer < self.manifest.num_layers:
            raise PromptError(f"layer {layer} is outside 0..{self.manifest.num_layers - 1}", "layer")
        return class_scores(self._score(prompts, batch, {"deep_prompts": layers,
                                                         "prompt_layer": np.full(self.LAYER_SHAPE, layer, np.int64)}),
                            batch.label_groups)

    def _prompts(self, prompt_embeds: np.ndarray) -> np.ndarray:
        try:
            prompts = np.ascontiguousarray(prompt_embeds, dtype=self.prompt_dtype)
        except (TypeError, ValueError):
            raise PromptError(f"prompt_embeds must be a [C, P, {self.manifest.hidden_size}] array of numbers",
                              "prompt_embeds") from None
        m = self.manifest
        if prompts.ndim != 3 or prompts.shape[2] != m.hidden_size or not 1 <= prompts.shape[0] or \
                not 0 <= prompts.shape[1] <= m.prompt_tokens:
            raise PromptError(f"prompt_embeds must be [C, P, {m.hidden_size}] with C >= 1 candidates and P <= "
                              f"{m.prompt_tokens} slots, got {list(prompts.shape)}", "prompt_embeds")
        return prompts

    def _score(self, prompts: np.ndarray, batch: EncodedSet, extra: dict) -> np.ndarray:
        raise NotImplementedError
