"""A RoBERTa-large-shaped random RobertaForMaskedLM, built offline (no hub), for the GPU benchmark.

`bbt_onnx_export.tiny.make_tiny_roberta` fixes intermediate_size at 2 x hidden (2048 at H 1024, not
RoBERTa-large's 4096) and layer_norm_eps at the default, so the config is written here; the tokenizer and
the seeded save come from bbt_onnx_export.tiny. The vocabulary defaults to RoBERTa's 50265 ids (the tiny BPE
tokenizer's ~800 ids are its first rows), so the embedding table and the torch baseline's full LM head have
the real sizes.

usage: python benchmarks/gpu/make_large.py OUT_DIR [--hidden 1024 --layers 24 --heads 16 --intermediate 4096
       --max-positions 512 --vocab 50265 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--max-positions", type=int, default=512, help="usable positions (config gets +2)")
    ap.add_argument("--vocab", type=int, default=50265, help="at least the tiny tokenizer's size")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import RobertaConfig

    from bbt_onnx_export.tiny import make_tokenizer, save_random

    t0 = time.perf_counter()
    tokenizer = make_tokenizer()
    config = RobertaConfig(vocab_size=max(args.vocab, len(tokenizer)), hidden_size=args.hidden,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           intermediate_size=args.intermediate, max_position_embeddings=args.max_positions + 2,
                           type_vocab_size=1, layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           initializer_range=0.02)
    save_random(args.out, "RobertaForMaskedLM", config, tokenizer, args.seed)
    info = {"dir": str(args.out), "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
            "intermediate": args.intermediate, "max_position_embeddings": args.max_positions + 2,
            "vocab_size": config.vocab_size, "tokenizer_size": len(tokenizer), "seconds": time.perf_counter() - t0}
    print(json.dumps(info))


if __name__ == "__main__":
    sys.exit(main())
