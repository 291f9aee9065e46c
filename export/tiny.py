"""Tiny random-weight checkpoints, built offline, for tests and the CPU demo.

A byte-level BPE tokenizer with RoBERTa's special tokens is trained with `tokenizers` on
text we write here, and a small RobertaForMaskedLM is created from a config: no hub.
`python -m bbt_onnx_export.tiny DIR` writes one.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

WORDS = ("the a an this that movie film story plot acting music scene actor director it was is "
         "great good fine bad awful terrible boring fun moving funny dull slow sharp warm cold "
         "world sports business tech news company school artist athlete office village animal plant "
         "album written yes no maybe category really very quite not never always love hate like "
         "day night city team game market price science computer phone river mountain song book").split()
# the presets' label words, which the reference tokenizes without a leading space
LABEL_WORDS = ("bad great World Sports Business Tech Company Education Artist Athlete Office Transportation "
               "Building Natural Village Animal Plant Album Film Written No Yes Maybe").split()
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + rng.choice([" .", " !", " ?", ""])
        out.append(f"{rng.choice(LABEL_WORDS)} {words}" if rng.random() < 0.5 else words)
    return out


def train_bpe(directory: str, texts: list[str] | None = None, vocab_size: int = 800) -> None:
    """vocab.json + merges.txt of a byte-level BPE with RoBERTa's special tokens, which the fast
    tokenizers' from_pretrained reads in transformers 4 and 5 alike."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts or corpus(), vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIALS,
                            show_progress=False)
    bpe.save_model(directory)


def make_tokenizer(texts: list[str] | None = None, vocab_size: int = 800):
    from transformers import RobertaTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        train_bpe(tmp, texts, vocab_size)
        return RobertaTokenizerFast.from_pretrained(tmp)


def save_random(directory: Path, architecture: str, config, tokenizer, seed: int) -> Path:
    """A seeded random model of `architecture` and its tokenizer, as save_pretrained writes them."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_roberta(directory: str | Path, hidden: int = 32, layers: int = 2, heads: int = 4,
                      max_positions: int = 128, seed: int = 0, texts: list[str] | None = None,
                      architecture: str = "RobertaForMaskedLM", init_std: float = 0.02) -> Path:
    """Write a save_pretrained directory (weights + fast tokenizer) of a random RoBERTa.

    A larger `init_std` than the usual 0.02 makes a random model respond visibly to its
    prompt, which tests of the tuning mechanics need.
    """
    from transformers import RobertaConfig

    directory = Path(directory)
    tokenizer = make_tokenizer(texts)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=hidden * 2,
                           max_position_embeddings=max_positions + 2, type_vocab_size=1,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, initializer_range=init_std)
    return save_random(directory, architecture, config, tokenizer, seed)


def make_tiny_causal(directory: str | Path, architecture: str = "LlamaForCausalLM", hidden: int = 32,
                     layers: int = 2, heads: int = 4, max_positions: int = 128, seed: int = 0,
                     init_std: float = 0.02, chat_template: str | None = None) -> Path:
    """A random decoder: Llama (its tokenizer adds <s>) or GPT-2 (no BOS, like the real GPT-2), with
    `chat_template` (jinja, as in tokenizer_config.json) when given."""
    import transformers
    from transformers import GPT2TokenizerFast

    directory = Path(directory)
    if architecture == "GPT2LMHeadModel":
        with tempfile.TemporaryDirectory() as tmp:
            train_bpe(tmp)
            tokenizer = GPT2TokenizerFast.from_pretrained(tmp, unk_token="<unk>", bos_token="</s>", eos_token="</s>")
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=heads,
                                         n_positions=max_positions, initializer_range=init_std,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    else:
        tokenizer = make_tokenizer()
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                                          num_hidden_layers=layers, num_attention_heads=heads,
                                          num_key_value_heads=heads // 2, max_position_embeddings=max_positions,
                                          initializer_range=init_std, bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return save_random(directory, architecture, config, tokenizer, seed)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bbt_onnx_export.tiny OUT_DIR")
    print(make_tiny_roberta(sys.argv[1]))
