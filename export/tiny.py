"""Tiny random-weight checkpoints, built offline, for tests and the CPU demo.

Each architecture's tokenizer is trained with `tokenizers` on text written here (a byte-level BPE, or BERT's
WordPiece), and the model is created from a config with random weights: no hub. Each family record holds its
architecture's `Tiny` recipe (export/families.py), which names the builders here;
`python -m bbt_onnx_export.tiny DIR [ARCHITECTURE]` writes one.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Callable

from .families import FAMILIES

WORDS = ("the a an this that movie film story plot acting music scene actor director it was is "
         "great good fine bad awful terrible boring fun moving funny dull slow sharp warm cold "
         "world sports business tech news company school artist athlete office village animal plant "
         "album written yes no maybe category really very quite not never always love hate like "
         "day night city team game market price science computer phone river mountain song book").split()
# the presets' label words, which the reference tokenizes without a leading space
LABEL_WORDS = ("bad great World Sports Business Tech Company Education Artist Athlete Office Transportation "
               "Building Natural Village Animal Plant Album Film Written No Yes Maybe").split()
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + rng.choice([" .", " !", " ?", ""])
        out.append(f"{rng.choice(LABEL_WORDS)} {words}" if rng.random() < 0.5 else words)
    return out


def train_bpe(directory: str, texts: list[str] | None = None, vocab_size: int = 800,
              specials: list[str] = SPECIALS) -> None:
    """vocab.json + merges.txt of a byte-level BPE with these special tokens, which the fast tokenizers'
    from_pretrained reads in transformers 4 and 5 alike."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts or corpus(), vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                            show_progress=False)
    bpe.save_model(directory)


def make_tokenizer(texts: list[str] | None = None, vocab_size: int = 800):
    """A byte-level BPE with RoBERTa's special tokens (RoBERTa, and Llama's tiny models)."""
    from transformers import RobertaTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        train_bpe(tmp, texts, vocab_size)
        return RobertaTokenizerFast.from_pretrained(tmp)


def gpt2_tokenizer():
    """The same BPE as GPT-2's tokenizer: no BOS added, like the real GPT-2."""
    from transformers import GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        train_bpe(tmp)
        return GPT2TokenizerFast.from_pretrained(tmp, unk_token="<unk>", bos_token="</s>", eos_token="</s>")


def bert_tokenizer():
    """A lower-cased WordPiece with BERT's [CLS], [SEP], [MASK] and [PAD]."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(corpus(), vocab_size=800, min_frequency=1, special_tokens=BERT_SPECIALS,
                                  show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        wordpiece.save_model(tmp)
        return BertTokenizerFast(vocab_file=str(Path(tmp) / "vocab.txt"))


def qwen2_tokenizer():
    """A byte-level BPE with Qwen2's split rule and special tokens: no BOS; EOS pads; a ChatML chat template."""
    from transformers import Qwen2TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        train_bpe(tmp, specials=QWEN_SPECIALS)
        tok = Qwen2TokenizerFast(vocab_file=str(Path(tmp) / "vocab.json"), merges_file=str(Path(tmp) / "merges.txt"),
                                 unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    tok.chat_template = QWEN_CHAT
    return tok


def save_random(directory: Path, architecture: str, config, tokenizer, seed: int,
                bias_std: float = 0.0) -> Path:
    """A seeded random model of `architecture` and its tokenizer, as save_pretrained writes them; `bias_std`
    draws the linear layers' biases too (zero at init), so that a test sees them."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    if bias_std:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0.0, bias_std)
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def roberta_config(tok, hidden, layers, heads, positions, std):
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=hidden * 2, max_position_embeddings=positions + 2, type_vocab_size=1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         initializer_range=std)


def bert_config(tok, hidden, layers, heads, positions, std):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=hidden * 2, max_position_embeddings=positions, type_vocab_size=2,
                      pad_token_id=tok.pad_token_id, initializer_range=std)


def llama_config(tok, hidden, layers, heads, positions, std, cls="LlamaConfig"):
    import transformers

    return getattr(transformers, cls)(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=positions,
        initializer_range=std, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)


def qwen2_config(tok, hidden, layers, heads, positions, std):
    return llama_config(tok, hidden, layers, heads, positions, std, cls="Qwen2Config")


def gpt2_config(tok, hidden, layers, heads, positions, std):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions,
                      initializer_range=std, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def builder(named: Callable | str) -> Callable:
    """A recipe's builder: the built-in records name this module's functions (so the records need not import it)."""
    return globals()[named] if isinstance(named, str) else named


def recipes() -> dict:
    """Each architecture's tiny recipe, from the family records (registered ones included), in their order."""
    return {f.architecture: f.tiny for f in FAMILIES.values() if f.tiny is not None}


def make_tiny(directory: str | Path, architecture: str = "RobertaForMaskedLM", hidden: int = 32, layers: int = 2,
              heads: int = 4, max_positions: int = 128, seed: int = 0, init_std: float = 0.02,
              chat_template: str | None = None) -> Path:
    """Write a save_pretrained directory (weights + fast tokenizer) of a random model of `architecture`, with
    `chat_template` (jinja, as in tokenizer_config.json) when given.

    A larger `init_std` than the usual 0.02 makes a random model respond visibly to its prompt, which tests of
    the tuning mechanics need.
    """
    tiny = recipes().get(architecture)
    if tiny is None:
        raise ValueError(f"no tiny recipe for architecture {architecture!r}; the family records have one for "
                         f"{', '.join(recipes())}")
    tokenizer = builder(tiny.tokenizer)()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = builder(tiny.config)(tokenizer, hidden, layers, heads, max_positions, init_std)
    return save_random(Path(directory), architecture, config, tokenizer, seed, init_std if tiny.bias_std else 0.0)


def make_tiny_roberta(directory: str | Path, **kwargs) -> Path:
    return make_tiny(directory, "RobertaForMaskedLM", **kwargs)


def make_tiny_causal(directory: str | Path, architecture: str = "LlamaForCausalLM", **kwargs) -> Path:
    return make_tiny(directory, architecture, **kwargs)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bbt_onnx_export.tiny", description="A tiny random checkpoint.")
    ap.add_argument("out")
    ap.add_argument("architecture", nargs="?", default="RobertaForMaskedLM", choices=list(recipes()))
    ap.add_argument("--init-std", type=float, default=0.02, help="weights' std; 0.5 makes the outputs move with "
                    "the prompt")
    args = ap.parse_args()
    print(make_tiny(args.out, args.architecture, init_std=args.init_std))
