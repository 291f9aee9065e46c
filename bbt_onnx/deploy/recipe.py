"""How a deployed classifier's rows are built from text: bbt-onnx's encoding, standalone.

`bbt-onnx deploy` writes this file beside a classifier that takes token ids (a tokenizer that
onnxruntime-extensions cannot express, such as BERT's WordPiece) as `encode.py`, with `recipe.json` and
`tokenizer.json`. It needs numpy and the `tokenizers` package only:

    import json, numpy as np
    from tokenizers import Tokenizer
    from encode import encode
    feeds = encode(json.load(open("recipe.json")), Tokenizer.from_file("tokenizer.json"), ["a gripping film"])
    probabilities, label = session.run(["probabilities", "label"], feeds)

The recipe describes one string per row, the template with the text in it (`segments`), which is tokenized
whole; the token ids that come before it and after it (`pre_ids`, `post_ids`: BOS, the prompt's slots, the rest
of a chat or suffix framing, EOS); and the row's limit. Each token belongs to the first field its characters
overlap (by the tokenizer's offsets), so truncation cuts the text fields only, from their ends, longest field
first, exactly as bbt-onnx does. Texts are stripped of surrounding whitespace first, as bbt-onnx's readers do.
As encode.py this file imports nothing from bbt-onnx: deploy writes `truncation_plan`'s source in place of its
one import. bbt-onnx's in-graph tokenizer follows the same recipe.
"""

from __future__ import annotations

import numpy as np

from ..truncation import truncation_plan  # its source stands here in encode.py

RECIPE_FORMAT = 1
TEXT_FIELDS = ("text", "text_b")


def render(recipe: dict, values: dict) -> tuple:
    """The row's string and each field's character span, in template order."""
    out, spans, pos = [], {}, 0
    for kind, value in recipe["segments"]:
        piece = values[value] if kind == "field" else value
        if kind != "literal":
            spans["mask" if kind == "mask" else value] = (pos, pos + len(piece))
        out.append(piece)
        pos += len(piece)
    return "".join(out), spans


def encode_row(recipe: dict, ids: list, offsets: list, spans: dict) -> tuple:
    """One row: (ids, mask_pos, prompt_pos), or a ValueError when the template leaves the text no room."""
    owner = [next((f for f, (a, b) in spans.items() if start < b and end > a), None) for start, end in offsets]
    pre, post = recipe["pre_ids"], recipe["post_ids"]
    over = len(pre) + len(ids) + len(post) - recipe["max_length"]
    if over > 0:
        drop = truncation_plan({f: owner.count(f) for f in TEXT_FIELDS}, over)
        if drop is None:
            raise ValueError(f"the template leaves no room for text within {recipe['max_length']} tokens")
        keep = [True] * len(ids)
        for i in range(len(ids) - 1, -1, -1):
            if drop.get(owner[i], 0) > 0:
                keep[i] = False
                drop[owner[i]] -= 1
        ids = [t for t, k in zip(ids, keep) if k]
        owner = [o for o, k in zip(owner, keep) if k]
    row = list(pre) + list(ids) + list(post)
    mask_pos = len(pre) + owner.index("mask") if recipe["mask"] == "token" else len(row) - 1
    prompt_pos = recipe["prompt_pos"] + (len(ids) if recipe["prompt_after_text"] else 0)
    return row, mask_pos, prompt_pos


def encode(recipe: dict, tokenizer, texts, texts_b=None) -> dict:
    """The classifier's inputs for these texts (and second texts, for a pair task), as numpy arrays."""
    if recipe.get("format") != RECIPE_FORMAT:
        raise ValueError(f"recipe format {recipe.get('format')!r}; this encoder reads {RECIPE_FORMAT}")
    texts = list(texts)
    if "text_b" in recipe["fields"]:
        if texts_b is None or len(list(texts_b)) != len(texts):
            raise ValueError("this task takes a second text for every row (texts_b)")
        texts_b = list(texts_b)
    rendered = [render(recipe, {"text": str(t).strip(), "text_b": str(texts_b[i]).strip() if texts_b else ""})
                for i, t in enumerate(texts)]
    encodings = tokenizer.encode_batch([r[0] for r in rendered], add_special_tokens=False) if texts else []
    rows = [encode_row(recipe, enc.ids, enc.offsets, spans) for (_, spans), enc in zip(rendered, encodings)]
    width = max((len(r[0]) for r in rows), default=0)
    input_ids = np.full((len(rows), width), recipe["pad_id"], dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, (row, _, _) in enumerate(rows):
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
             "mask_pos": np.array([r[1] for r in rows], dtype=np.int64)}
    if recipe["prompt_positions"]:
        feeds["prompt_pos"] = np.array([r[2] for r in rows], dtype=np.int64)
    return feeds
