"""The classifier's front: strings in, the scoring graph's row inputs out, built from ONNX and
onnxruntime-extensions ops so that it runs inside the graph. It follows the recipe (`recipe.py`) to the token:

1. each text is stripped of surrounding whitespace (Python's `str.isspace`, as bbt-onnx's readers do);
2. the template is filled around it into one string per row and tokenized whole by onnxruntime-extensions'
   `HfJsonTokenizer` (from the model's own tokenizer.json), as the runtime tokenizes the filled template; a
   special token is appended to every string and dropped after (the op loses a trailing partial special token
   otherwise), and whitespace before a special token that swallows it (RoBERTa's `<mask>`, lstrip) is removed
   first, since the op does not;
3. each token's byte span is the running sum of its byte length (a table over the vocabulary), trimmed of
   spaces as the tokenizer's post-processor trims its offsets; a token belongs to the first field its span
   overlaps, so truncation cuts the text fields from their ends, longest first, as `truncation_plan` does;
4. the kept tokens are compacted and put between the recipe's `pre_ids` and `post_ids`; the mask position and
   the first prompt slot are computed on the way.

Byte-level BPE tokenizers only (RoBERTa, GPT-2, Llama-3/SmolLM2, Qwen2 style); `graph_tokenizer` says why
another cannot be used, and those get a graph that takes token ids, with the recipe beside it.
"""

from __future__ import annotations

import json
import re

import numpy as np

from .recipe import TEXT_FIELDS

CONTRIB = "ai.onnx.contrib"


def _char_class(chars: list[int]) -> str:
    """An RE2 character class of these code points, as ranges."""
    out, i = [], 0
    while i < len(chars):
        j = i
        while j + 1 < len(chars) and chars[j + 1] == chars[j] + 1:
            j += 1
        out.append(f"\\x{{{chars[i]:x}}}" + (f"-\\x{{{chars[j]:x}}}" if j > i else ""))
        i = j + 1
    return "[" + "".join(out) + "]"


PY_SPACE = _char_class([c for c in range(0x3001) if chr(c).isspace()])  # str.strip's whitespace
# Rust's char::is_whitespace (the White_Space property): what an lstrip/rstrip special token swallows
RUST_SPACE = _char_class([*range(0x9, 0xE), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                          0x202F, 0x205F, 0x3000])
STRIP = f"^{PY_SPACE}+|{PY_SPACE}+$"


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode map, inverted: the character a byte-level vocabulary writes for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


BYTES = _byte_alphabet()


def _byte_levels(pre) -> list[dict]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return [p for p in pre.get("pretokenizers", []) if p.get("type") == "ByteLevel"]
    return [pre] if pre.get("type") == "ByteLevel" else []


def graph_tokenizer(tj: dict) -> str | None:
    """None when onnxruntime-extensions can run this tokenizer.json in the graph, else why not."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        return f"its tokenizer is a {model.get('type')} model, not a byte-level BPE"
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = {p.get("type") for p in parts}
    levels = _byte_levels(pre)
    if not levels or not kinds <= {"ByteLevel", "Split", "Digits"}:
        return f"its pre-tokenizer ({', '.join(sorted(str(k) for k in kinds))}) is not a byte-level one"
    if any(p.get("add_prefix_space") for p in levels):
        return "its byte-level pre-tokenizer adds a prefix space"
    norm = tj.get("normalizer")
    norms = (norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]) if norm else []
    if any(n.get("type") != "NFC" for n in norms):
        return f"its normalizer ({', '.join(n.get('type', '?') for n in norms)}) is not one onnxruntime-extensions runs"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        return "its BPE uses subword prefixes, suffixes or dropout"
    vocab = model.get("vocab", {})
    if sorted(vocab.values()) != list(range(len(vocab))):
        return "its vocabulary's ids have gaps"  # onnxruntime-extensions 0.15 crashes on them
    if any(ch not in BYTES for token in vocab for ch in token):
        return "its vocabulary is not written in the byte-level alphabet"
    if not all(ch in vocab for ch in BYTES) and _unk(tj)[0] is None:
        return "its vocabulary lacks some bytes and it has no unknown token"
    if _sentinel(tj) is None:
        return "it has no special token to close each string with"
    return None


def _sentinel(tj: dict) -> dict | None:
    """A special token that swallows no whitespace: appended to every string, then dropped."""
    for tok in tj.get("added_tokens", []):
        if tok.get("special") and tok.get("content") and not (tok.get("lstrip") or tok.get("rstrip")
                                                              or tok.get("single_word")):
            return tok
    return None


def _trims_offsets(tj: dict) -> bool:
    """Whether the post-processor trims spaces off the offsets (RoBERTa's does; the runtime sees trimmed ones)."""
    post = tj.get("post_processor") or {}
    procs = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    return any(p.get("type") in ("ByteLevel", "RobertaProcessing") and p.get("trim_offsets", False) for p in procs)


def _swallowing(tj: dict) -> list[str]:
    """RE2 patterns (one capture group, the token) of the special tokens that swallow the whitespace beside
    them (lstrip, rstrip), whitespace included: the op does not swallow it, so the graph removes it first."""
    out = []
    for tok in tj.get("added_tokens", []):
        if tok.get("lstrip") or tok.get("rstrip"):
            body = re.escape(tok["content"])
            out.append((f"{RUST_SPACE}+" if tok.get("lstrip") else "") + f"({body})" +
                       (f"{RUST_SPACE}+" if tok.get("rstrip") else ""))
    return out


def segment_bytes(recipe: dict, tj: dict) -> list[int | None]:
    """Each literal (and mask) segment's length in bytes once the swallowed whitespace is removed, as it is in
    the graph's string; None for the fields (whose values never start or end with whitespace: they are stripped)."""
    field = "\ue000"  # stands for a field's value: no whitespace and no special token
    text, owner = "", []
    for i, (kind, value) in enumerate(recipe["segments"]):
        piece = field if kind == "field" else value
        text += piece
        owner += [i] * len(piece)
    gone = [False] * len(text)
    for pattern in _swallowing(tj):
        for match in re.finditer(_python_pattern(pattern), text):
            kept = match.span(1)
            for k in range(*match.span()):
                if not kept[0] <= k < kept[1]:
                    gone[k] = True
    sizes: list[int | None] = [None if kind == "field" else 0 for kind, _ in recipe["segments"]]
    for ch, i, g in zip(text, owner, gone):
        if sizes[i] is not None and not g:
            sizes[i] += len(ch.encode("utf-8"))
    return sizes


def _python_pattern(pattern: str) -> str:
    """An RE2 pattern of ours in Python's re syntax (\\x{HHHH} escapes)."""
    return re.sub(r"\\x\{([0-9a-f]+)\}", lambda m: f"\\U{int(m.group(1), 16):08x}", pattern)


def token_tables(tj: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token id: its length in bytes, and the spaces at its start and end that offset trimming removes."""
    entries = [(tok, i, True) for tok, i in tj["model"]["vocab"].items()]
    entries += [(t["content"], t["id"], False) for t in tj.get("added_tokens", [])]
    size = max(i for _, i, _ in entries) + 1
    length, lead, trail = (np.zeros(size, np.int32) for _ in range(3))
    for tok, i, byte_level in entries:
        def nbytes(chars: str) -> int:
            return len(chars) if byte_level else len(chars.encode("utf-8"))

        def space(ch: str) -> bool:
            return ch == "Ġ" or ch.isspace()

        length[i] = nbytes(tok)
        head = len(tok) - len(tok.lstrip("".join(c for c in set(tok) if space(c))))
        tail = len(tok) - len(tok.rstrip("".join(c for c in set(tok) if space(c))))
        lead[i], trail[i] = nbytes(tok[:head]), nbytes(tok[len(tok) - tail:]) if tail else 0
    return length, lead, trail


def op_tokenizer_json(tj: dict) -> str:
    """tokenizer.json as the op takes it: no post-processor (it would add BOS/EOS), a byte-level decoder (another
    one, such as a GGUF conversion's byte-fallback chain, switches the op to SentencePiece handling), no byte
    fallback (bytes outside the vocabulary come out as UNKNOWN, which the graph maps)."""
    model = {**tj["model"], "byte_fallback": False}
    decoder = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return json.dumps({**tj, "post_processor": None, "decoder": decoder, "model": model}, ensure_ascii=False)


UNKNOWN = 4294967295  # the op's id for a byte outside the vocabulary


def _unk(tj: dict) -> tuple[int | None, bool]:
    """The unknown token's id (where the runtime puts a byte outside the vocabulary), and whether runs of them
    fuse into one."""
    model = tj["model"]
    token = model.get("unk_token")
    return (model["vocab"].get(token) if token else None), bool(model.get("fuse_unk"))


OP_CONFIG = json.dumps({"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "add_eos_token": False})


class Graph:
    """Nodes and constants under one name prefix."""

    def __init__(self, prefix: str, opset: int):
        self.prefix = prefix
        self.opset = opset  # the default domain's: ReduceMax and ReduceMin take their axes as an input from 18
        self.nodes: list = []
        self.inits: list = []
        self.count = 0

    def name(self, hint: str = "t") -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def const(self, value, dtype=None, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        text = isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, str) for v in value))
        arr = np.array(value, dtype=object if text else dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", out: str | None = None, **attrs):
        from onnx import helper

        names = [out] if out else [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name("n_" + op_type),
                                           domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def reduce(self, op_type: str, x: str, axis: int, out: str | None = None) -> str:
        """A reduction over one axis, dropping it, in this opset's form."""
        if op_type != "ReduceSum" and self.opset < 18:
            return self.op(op_type, x, axes=[axis], keepdims=0, out=out)
        return self.op(op_type, x, self.const([axis], np.int64), keepdims=0, out=out)


def build_front(g: Graph, recipe: dict, tj: dict, outputs: dict[str, str],
                inputs: dict[str, str] | None = None) -> None:
    """Nodes from the strings `inputs` names (text, and text_b for a pair task; by default tensors of those
    names) to the row inputs named in `outputs` (input_ids, attention_mask, mask_pos and, when the recipe says
    so, prompt_pos)."""
    inputs = inputs or {f: f for f in recipe["fields"]}
    from onnx import TensorProto

    i64 = TensorProto.INT64
    sentinel = _sentinel(tj)["content"]
    length, lead, trail = token_tables(tj)
    pair = "text_b" in recipe["fields"]
    zero, one = g.const(0, np.int64), g.const(1, np.int64)
    ax0, ax1 = g.const([0], np.int64), g.const([1], np.int64)

    # 1. fields stripped; the string filled and closed with the sentinel
    strip, empty = g.const([STRIP]), g.const([""])
    fields = {f: g.op("StringRegexReplace", inputs[f], strip, empty, domain=CONTRIB) for f in recipe["fields"]}
    shape = g.op("Shape", inputs["text"])
    pieces = []
    for kind, value in recipe["segments"]:
        pieces.append(fields[value] if kind == "field" else g.op("Expand", g.const([value]), shape))
    pieces.append(g.op("Expand", g.const([sentinel]), shape))
    string = pieces[0]
    for piece in pieces[1:]:
        string = g.op("StringConcat", string, piece, domain=CONTRIB)
    for pattern in _swallowing(tj):
        string = g.op("StringRegexReplace", string, g.const([pattern]), g.const(["\\1"]), domain=CONTRIB)
    batch = string
    if pair:  # the first text alone too, for its length in bytes
        alone = g.op("StringConcat", fields["text"], pieces[-1], domain=CONTRIB)
        batch = g.op("Concat", string, alone, axis=0)

    # 2. tokenized whole; the sentinel dropped
    ids, mask = g.op("HfJsonTokenizer", batch, outputs=2, domain=CONTRIB, tokenizer_vocab=op_tokenizer_json(tj),
                     tokenizer_config=OP_CONFIG)
    width = g.op("Gather", g.op("Shape", ids), one, axis=0)  # L
    j = g.op("Unsqueeze", g.op("Range", zero, width, one), ax0)  # [1, L]
    ends_at = g.op("Sub", g.op("ReduceSum", mask, ax1, keepdims=0), one)  # [B]: the sentinel's position
    present = g.op("Less", j, g.op("Unsqueeze", ends_at, ax1))  # [B, L]: a token of the string
    valid = present
    unk, fuse = _unk(tj)
    unknown = None
    if not all(ch in tj["model"]["vocab"] for ch in BYTES):  # bytes outside the vocabulary: the unknown token
        unknown = g.op("Equal", ids, g.const(UNKNOWN, np.int64))
        ids = g.op("Where", unknown, g.const(unk, np.int64), ids)
        if fuse:  # a run of them is one token; the rest of the run only takes up bytes
            first = g.op("Cast", g.op("Slice", g.op("Mul", ids, zero), ax0, ax1, ax1), to=TensorProto.BOOL)  # [B, 1]
            before = g.op("Slice", g.op("Concat", first, unknown, axis=1), ax0, g.op("Reshape", width, ax1), ax1)
            valid = g.op("And", present, g.op("Not", g.op("And", unknown, before)))
    count = g.op("ReduceSum", g.op("Cast", valid, to=i64), ax1, keepdims=0)  # [B]: tokens of the string

    # 3. byte spans, trimmed as the runtime's offsets are; the fields' spans
    def table(values):
        return g.op("Cast", g.op("Gather", g.const(values), ids, axis=0), to=i64)

    nbytes = table(length) if unknown is None else g.op("Where", unknown, one, table(length))
    nbytes = g.op("Where", present, nbytes, zero)
    ends = g.op("CumSum", nbytes, one)
    starts = g.op("Sub", ends, nbytes)
    if _trims_offsets(tj):
        starts = g.op("Min", g.op("Add", starts, table(lead)), ends)
        ends = g.op("Max", g.op("Sub", ends, table(trail)), starts)
    total = g.op("ReduceSum", nbytes, ax1, keepdims=0)  # [B]
    if pair:
        n_rows = g.op("Gather", shape, zero, axis=0)
        cut = g.op("Unsqueeze", n_rows, ax0)
        part = lambda t, a, b: g.op("Slice", t, a, b, ax0)  # noqa: E731
        big = g.const([1 << 62], np.int64)
        ids, valid, starts, ends, count = (part(t, ax0, cut) for t in (ids, valid, starts, ends, count))
        text_bytes = part(total, cut, big)
        total = part(total, ax0, cut)
    seg_bytes = segment_bytes(recipe, tj)
    literal = sum(n for n in seg_bytes if n is not None)
    sizes = {"text": text_bytes if pair else g.op("Sub", total, g.const(literal, np.int64))}
    if pair:
        sizes["text_b"] = g.op("Sub", g.op("Sub", total, g.const(literal, np.int64)), text_bytes)
    spans, at = {}, g.op("Mul", count, zero)  # [N], in bytes
    for (kind, value), n in zip(recipe["segments"], seg_bytes):
        size = sizes[value] if kind == "field" else g.const(n, np.int64)
        end = g.op("Add", at, size)
        if kind != "literal":
            spans["mask" if kind == "mask" else value] = (at, end)
        at = end
    taken, owns = None, {}
    for field, (a, b) in spans.items():
        over = g.op("And", g.op("Less", starts, g.op("Unsqueeze", b, ax1)),
                    g.op("Greater", ends, g.op("Unsqueeze", a, ax1)))
        over = g.op("And", over, valid)
        if taken is not None:
            over = g.op("And", over, g.op("Not", taken))
        owns[field] = over
        taken = over if taken is None else g.op("Or", taken, over)

    # 4. truncation plan: how many tokens each text field loses
    fixed = len(recipe["pre_ids"]) + len(recipe["post_ids"])
    over = g.op("Max", g.op("Sub", g.op("Add", count, g.const(fixed, np.int64)),
                            g.const(recipe["max_length"], np.int64)), zero)  # [N]
    counts = {f: g.op("ReduceSum", g.op("Cast", owns[f], to=i64), ax1, keepdims=0) for f in TEXT_FIELDS if f in owns}
    drops = _plan(g, counts, over, zero)
    keep = valid
    for f, drop in drops.items():
        rank = g.op("CumSum", g.op("Cast", owns[f], to=i64), one)  # 1-based among the field's tokens
        last_kept = g.op("Sub", counts[f], drop)
        dropped = g.op("And", owns[f], g.op("Greater", rank, g.op("Unsqueeze", last_kept, ax1)))
        keep = g.op("And", keep, g.op("Not", dropped))

    # 5. kept tokens compacted, between pre_ids and post_ids
    keep64 = g.op("Cast", keep, to=i64)
    slot = g.op("Sub", g.op("CumSum", keep64, one), one)
    kept = g.op("ReduceSum", keep64, ax1, keepdims=0)  # [N]
    target = g.op("Where", keep, slot, width)
    rows = g.op("Slice", g.op("Shape", ids), ax0, ax1)  # [N]
    buffer = g.op("ConstantOfShape", g.op("Concat", rows, g.op("Reshape", g.op("Add", width, one), ax1), axis=0),
                  value=_tensor(0))
    compact = g.op("ScatterElements", buffer, target, ids, axis=1)  # [N, L + 1]
    pre, post = recipe["pre_ids"], recipe["post_ids"]
    p, q = g.const(len(pre), np.int64), g.const(len(post), np.int64)
    text_end = g.op("Add", kept, p)  # [N]
    row_end = g.op("Add", text_end, q)
    widest = g.reduce("ReduceMax", g.op("Concat", row_end, g.const([0], np.int64), axis=0), 0)
    k = g.op("Unsqueeze", g.op("Range", zero, widest, one), ax0)  # [1, W]
    nw = g.op("Concat", rows, g.op("Reshape", widest, ax1), axis=0)
    text_idx = g.op("Expand", g.op("Clip", g.op("Sub", k, p), zero, width), nw)
    value = g.op("GatherElements", compact, text_idx, axis=1)
    in_text = g.op("Less", k, g.op("Unsqueeze", text_end, ax1))
    in_row = g.op("Less", k, g.op("Unsqueeze", row_end, ax1))
    value = g.op("Where", in_row, value, g.const(recipe["pad_id"], np.int64)) if not post else value
    if post:
        after = g.op("Clip", g.op("Sub", k, g.op("Unsqueeze", text_end, ax1)), zero,
                     g.const(len(post) - 1, np.int64))
        post_value = g.op("Gather", g.const(post, np.int64), after, axis=0)
        value = g.op("Where", in_text, value, g.op("Where", in_row, post_value, g.const(recipe["pad_id"], np.int64)))
    if pre:
        before = g.op("Clip", k, zero, g.const(len(pre) - 1, np.int64))
        pre_value = g.op("Gather", g.const(pre, np.int64), before, axis=0)
        value = g.op("Where", g.op("Less", k, p), pre_value, value)
    g.op("Identity", value, out=outputs["input_ids"])
    g.op("Cast", in_row, to=i64, out=outputs["attention_mask"])
    if recipe["mask"] == "token":
        at_mask = g.op("Where", g.op("And", owns["mask"], keep), slot, g.const(1 << 62, np.int64))
        g.op("Add", g.reduce("ReduceMin", at_mask, 1), p, out=outputs["mask_pos"])
    else:
        g.op("Sub", row_end, one, out=outputs["mask_pos"])
    if "prompt_pos" in outputs:
        base = g.const(recipe["prompt_pos"], np.int64)
        if recipe["prompt_after_text"]:
            g.op("Add", kept, base, out=outputs["prompt_pos"])
        else:
            g.op("Add", g.op("Mul", kept, zero), base, out=outputs["prompt_pos"])


def _tensor(value: int):
    from onnx import helper, TensorProto

    return helper.make_tensor("v", TensorProto.INT64, [1], [value])


def _plan(g: Graph, counts: dict, over: str, zero: str) -> dict:
    """`truncation_plan` for every row at once: one field loses `over`; of two, the longer is cut to the other's
    length first and the rest is shared, the first field taking the odd one."""
    if len(counts) == 1:
        (field, _), = counts.items()
        return {field: over}
    a, b = counts["text"], counts["text_b"]
    d = g.op("Sub", a, b)
    gap = g.op("Abs", d)
    rest = g.op("Max", g.op("Sub", over, gap), zero)
    two = g.const(2, np.int64)
    half = g.op("Div", rest, two)
    odd = g.op("Mod", rest, two)
    first = g.op("Add", g.op("Add", g.op("Min", g.op("Max", d, zero), over), half), odd)
    second = g.op("Add", g.op("Min", g.op("Max", g.op("Neg", d), zero), over), half)
    return {"text": first, "text_b": second}
