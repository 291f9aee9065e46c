"""The graph contract, one source for export and runtime: tensor names, their dynamic axes, and the manifest's
name for each graph variant. Export builds graphs to it; engines feed graphs by it; servers publish it."""

from __future__ import annotations

PARTS = ("text", "tail")  # the cached pair for suffix prompts

GRAPH_INPUTS = ("input_ids", "attention_mask", "mask_pos", "prompt_embeds", "label_ids")
PROMPT_POS = "prompt_pos"  # decoders' graphs: each row's first prompt slot [N] (older graphs fix it after BOS)
DEEP_INPUTS = ("deep_prompts", "prompt_layer")  # BBTv2: a prompt on every layer's input, and the layer searched
GRAPH_OUTPUTS = ("label_logits",)
ROW_INPUTS = ("input_ids", "attention_mask", "mask_pos", "label_ids")  # what an encoded set of rows feeds
# the cached pair: the text graph computes every layer's keys and values once, the tail graph scores C prompts on
# the slots and the answer cue, attending to them
TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_OUTPUTS = ("text_kv",)  # [L, 2, N, kv_heads, S, head_dim]
TAIL_INPUTS = ("text_kv", "text_mask", "tail_ids", "mask_pos", "prompt_embeds", "label_ids")
# a prefix every row shares (demonstrations), before each row's text: its keys and values once, batch 1, which both
# halves of the pair take and broadcast over the rows; length 0 for rows without one. Pairs exported before it lack it.
PREFIX_KV = "prefix_kv"  # [L, 2, 1, kv_heads, S_p, head_dim]
PREFIX_INPUTS = (PREFIX_KV,)
PREFIX_IDS = "prefix_ids"  # [S_p]: the shared prefix's ids, as serve's NAME.cached takes them

# dynamic axes by tensor: C candidates, N rows, T tokens, P prompt slots, K label words; S text and U tail tokens
AXES = {
    "input_ids": {0: "N", 1: "T"},
    "attention_mask": {0: "N", 1: "T"},
    "mask_pos": {0: "N"},
    "prompt_embeds": {0: "C", 1: "P"},
    "label_ids": {0: "K"},
    "label_logits": {0: "C", 1: "N", 2: "K"},
    PROMPT_POS: {0: "N"},
    "deep_prompts": {1: "P"},
}
CACHE_AXES = {"input_ids": {0: "N", 1: "S"}, "attention_mask": {0: "N", 1: "S"}, "text_kv": {2: "N", 4: "S"},
              "text_mask": {0: "N", 1: "S"}, "tail_ids": {0: "N", 1: "U"}, "mask_pos": {0: "N"},
              "prompt_embeds": {0: "C", 1: "P"}, "label_ids": {0: "K"}, "label_logits": {0: "C", 1: "N", 2: "K"},
              PREFIX_KV: {4: "S_p"}}


def graph_inputs(prompt_positions: bool, deep: bool) -> tuple[str, ...]:
    """A prompt graph's inputs, in the order the export wrappers take them."""
    return GRAPH_INPUTS + ((PROMPT_POS,) if prompt_positions else ()) + (DEEP_INPUTS if deep else ())


def graph_key(precision: str, deep: bool = False, part: str = "") -> str:
    """The manifest's name for a graph: `fp32`, `deep-fp32` for the deep-prompt variant, `text-fp32` and
    `tail-fp32` for the cached pair."""
    return f"{part}-{precision}" if part else f"deep-{precision}" if deep else precision


def contract(deep: bool = False, part: str = "") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The inputs and outputs a graph of this kind must have (besides a decoder's prompt_pos, and the cached pair's
    `optional_inputs`)."""
    if part == "text":
        return TEXT_INPUTS, TEXT_OUTPUTS
    if part == "tail":
        return TAIL_INPUTS, GRAPH_OUTPUTS
    return graph_inputs(False, deep), GRAPH_OUTPUTS


def optional_inputs(part: str = "") -> tuple[str, ...]:
    """Inputs a graph of this kind may lack, having been exported before they existed: the cached pair's prefix."""
    return PREFIX_INPUTS if part in PARTS else ()
