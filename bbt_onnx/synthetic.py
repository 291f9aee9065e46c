"""A synthetic two-class sentiment set for demos, benchmarks and tests.

Each sentence carries its label in two sentiment words among filler words, so a model
can in principle read it. `python -m bbt_onnx.synthetic OUT_DIR` writes pool.csv and test.csv.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

from .data import Example

POSITIVE = "great good fun moving funny warm sharp love".split()
NEGATIVE = "bad awful terrible boring dull slow cold hate".split()
FILLER = "the movie film story plot acting music scene actor director it was is really very quite".split()


def sentiment_rows(n: int, seed: int, min_words: int = 4, max_words: int = 10) -> list[tuple[str, int]]:
    """(sentence, label) pairs, labels alternating 0/1."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(min_words, max_words))]
        for _ in range(2):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def sentiment_examples(n: int, seed: int, **kw) -> list[Example]:
    return [Example(text, None, str(label)) for text, label in sentiment_rows(n, seed, **kw)]


def write_csv(path: str | Path, rows, header=("sentence", "label")) -> Path:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m bbt_onnx.synthetic OUT_DIR [POOL_ROWS] [TEST_ROWS]")
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "pool.csv", sentiment_rows(int(argv[1]) if len(argv) > 1 else 200, seed=1))
    write_csv(out / "test.csv", sentiment_rows(int(argv[2]) if len(argv) > 2 else 200, seed=2))
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
