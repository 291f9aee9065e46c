"""The family registry: one record per architecture bbt-onnx exports, and nothing about an architecture elsewhere.

A record says which transformers class it is, which LM kind (the runtime's `bbt_onnx.kinds`), how to reach its
blocks and the embeddings the prompt is added to, which wrappers compute the graph contract and the reference's
PyTorch forward, how its tokenizer names the special tokens and whether its rows open with BOS, the label words'
prefix, the positions it reserves, its onnxruntime fusion type and int8 record, and what it supports (the cached
pair, chat templates, int8 levels), and the recipe of its tiny test model. A new architecture is one record here
(`register` adds one from outside the package), plus its wrappers when no existing one computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from bbt_onnx.errors import SettingsError
from bbt_onnx.kinds import KINDS, SENTIMENT
from bbt_onnx.tasks import Framing, Task

from .reference import CausalReference, MaskedReference
from .errors import ExportError
from .quantize import LLAMA_MLP, Int8Family
from .wrappers import BertHead, CausalPromptScorer, MaskedPromptScorer, RobertaHead, reach

SPECIALS = {"bos": "bos", "eos": "eos", "pad": "pad", "mask": "mask"}  # contract id -> the tokenizer's token


@dataclass(frozen=True)
class Tiny:
    """How the tests' tiny random model of an architecture is made (`tiny.make_tiny`): its tokenizer, and its
    config from the common sizes."""

    tokenizer: Callable | str  # () -> a fast tokenizer; a name is export/tiny.py's builder of that name
    config: Callable | str  # (tokenizer, hidden, layers, heads, max_positions, init_std) -> a transformers config
    bias_std: bool = False  # draw the attention biases (Qwen2's q/k/v) at init_std
    own_chat: bool = False  # the tokenizer brings its own chat template (Qwen2's ChatML)


@dataclass(frozen=True)
class Family:
    architecture: str  # the transformers class
    model_type: str  # config.model_type
    kind: str  # the runtime's LM kind: "masked" or "causal"
    body: str  # the base model, from the LM
    blocks: str  # its layers, from the base model
    embeddings: str  # from the LM: the module whose output the prompt is added to
    scorer: type  # the graph contract's torch module (export/wrappers.py)
    reference: type  # the reference implementation's PyTorch forward, timed by bench (export/baseline.py)
    head: type | None = None  # masked LMs: the LM head up to its decoder (export/wrappers.py)
    specials: dict[str, str] = field(default_factory=lambda: dict(SPECIALS))
    bos_always: bool = True  # rows open with BOS; else only when the tokenizer adds it
    label_prefix: str = ""  # put before a label word that has no leading space
    position_offset: Callable = lambda config: 0  # positions the model reserves before the first token
    fusion_type: str | None = None  # onnxruntime's transformer optimizer model type; None: no fusions
    int8: Int8Family | None = None  # the calibrated int8 pass's record; None: dynamic int8
    kv_cache: bool = False  # the cached text/tail pair for suffix prompts
    chat: bool = False  # a chat template may frame the rows
    parity_template: str = SENTIMENT  # the rows export checks parity on, with its own label words
    parity_framing: Framing = Framing()
    tiny: Tiny | None = None  # how the tests' tiny random model of it is made (export/tiny.py)

    def parity_task(self, labels) -> Task:
        """The task of export's parity rows, with `labels` (export picks words every vocabulary has)."""
        return Task("parity", self.parity_template, labels, framing=self.parity_framing)

    @property
    def lm(self):
        return KINDS[self.kind]

    def layers(self, model):
        """The blocks, in order: BBTv2's prompts go onto their inputs."""
        return reach(reach(model, self.body), self.blocks)

    def embedding_module(self, model):
        """The module whose output the prompt is added to."""
        return reach(model, self.embeddings)

    def max_positions(self, config) -> int:
        return int(config.max_position_embeddings) - self.position_offset(config)


MASKED = dict(kind="masked", scorer=MaskedPromptScorer, reference=MaskedReference, fusion_type="bert")
CAUSAL = dict(kind="causal", scorer=CausalPromptScorer, reference=CausalReference, bos_always=False,
              label_prefix=" ", kv_cache=True, chat=True,
              parity_template=" {text}\nAnswer:", parity_framing=Framing(position="suffix"))

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("RobertaForMaskedLM", "roberta", body="roberta", blocks="encoder.layer", embeddings="roberta.embeddings",
           head=RobertaHead, position_offset=lambda config: int(config.pad_token_id) + 1,
           tiny=Tiny("make_tokenizer", "roberta_config"), **MASKED),
    Family("BertForMaskedLM", "bert", body="bert", blocks="encoder.layer", embeddings="bert.embeddings",
           head=BertHead, specials={**SPECIALS, "bos": "cls", "eos": "sep"},
           tiny=Tiny("bert_tokenizer", "bert_config"), **MASKED),
    Family("LlamaForCausalLM", "llama", body="model", blocks="layers", embeddings="model.embed_tokens",
           int8=LLAMA_MLP, tiny=Tiny("make_tokenizer", "llama_config"), **CAUSAL),
    Family("Qwen2ForCausalLM", "qwen2", body="model", blocks="layers", embeddings="model.embed_tokens",
           int8=LLAMA_MLP, tiny=Tiny("qwen2_tokenizer", "qwen2_config", bias_std=True,
                                     own_chat=True), **CAUSAL),
    Family("GPT2LMHeadModel", "gpt2", body="transformer", blocks="h", embeddings="transformer.wte", fusion_type="gpt2",
           int8=Int8Family(), tiny=Tiny("gpt2_tokenizer", "gpt2_config"), **CAUSAL),
)}


def register(family: Family, replace: bool = False) -> Family:
    """Add an architecture defined outside this package, so export and the tests find it like the built-in ones.
    A model_type already registered is refused unless `replace`: two records for one checkpoint is a mistake."""
    old = FAMILIES.get(family.model_type)
    if old is not None and not replace:
        raise SettingsError(f"model_type {family.model_type!r} is already registered (as {old.architecture}); pass "
                            "replace=True to replace its record", "replace")
    FAMILIES[family.model_type] = family
    return family


def supported() -> str:
    masked = ", ".join(f.architecture for f in FAMILIES.values() if f.kind == "masked")
    causal = ", ".join(f.architecture for f in FAMILIES.values() if f.kind == "causal")
    return f"masked LMs ({masked}) and causal LMs ({causal})"


def family_of(config) -> Family:
    """The record of a supported config, else an error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    if model_type not in FAMILIES:
        what = archs[0] if archs else f"model_type {model_type!r}"
        raise ExportError(f"{what} is not supported: bbt-onnx exports {supported()}")
    family = FAMILIES[model_type]
    if archs and family.architecture not in archs:
        raise ExportError(f"this checkpoint is a {archs[0]}, without the LM head BBT scores with: bbt-onnx exports "
                          f"{supported()}")
    return family
