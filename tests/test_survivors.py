"""Tests written for mutations that once survived the suite: each pins one line whose breakage nothing else saw."""

from __future__ import annotations

from pathlib import Path

import pytest

from bbt_onnx import fileio
from bbt_onnx.contract import graph_key
from bbt_onnx.errors import ModelError, StorageError
from bbt_onnx.manifest import GraphSpec, Manifest, load_manifest


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_failed_move_into_place_puts_the_old_directory_back(tmp_path, monkeypatch):
    """swap_in renames the old directory aside before moving the new one in; when that move fails, the old one
    must be back where it was, whole."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("old a")
    (out / "sub" / "b.bin").write_bytes(b"\x00old b")
    before = tree(out)
    staged = []

    def fill(staging: Path) -> None:
        staged.append(staging)
        (staging / "a.txt").write_text("new a")

    real_rename = Path.rename

    def rename(self, target):
        if staged and self == staged[0]:  # the new directory moving into place, and only that
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(StorageError, match="No space left"):
        fileio.write_dir(out, force=True, fill=fill, force_any=True)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing aside, no staging left


def small_manifest(**changes) -> Manifest:
    """A masked LM's manifest, as export would write it for a vocabulary of 100 (no graph files: read with
    graphs=False)."""
    fp32 = GraphSpec(file="model.onnx", precision="fp32", sha256="0" * 64, inputs=(), outputs=())
    fields = dict(kind="masked", architecture="RobertaForMaskedLM", model_type="roberta", source="tiny",
                  hidden_size=8, num_layers=2, num_heads=2, vocab_size=100, max_positions=64, prompt_tokens=4,
                  bos_id=0, eos_id=2, pad_id=1, mask_id=3, placeholder_ids=(10, 11, 12, 13), embedding_std=0.5,
                  embedding_mean=0.0, label_prefix=" ", opset=17, versions={}, graphs={graph_key("fp32"): fp32},
                  bos_token_id=0)
    return Manifest(**{**fields, **changes})


def load_written(manifest: Manifest, directory: Path) -> Manifest:
    directory.mkdir()
    manifest.write(directory)
    return load_manifest(directory, graphs=False)


@pytest.mark.parametrize("name", ["bos_id", "eos_id", "pad_id", "mask_id", "bos_token_id"])
def test_a_special_id_equal_to_the_vocabulary_size_is_refused_by_the_manifest(tmp_path, name):
    """Ids run 0..vocab_size - 1: the manifest's own check refuses vocab_size, before any tokenizer is read."""
    assert getattr(load_written(small_manifest(**{name: 99}), tmp_path / "last"), name) == 99
    with pytest.raises(ModelError, match=rf"{name} 100 is outside the vocabulary \(0\.\.99\)"):
        load_written(small_manifest(**{name: 100}), tmp_path / "over")


def test_a_placeholder_id_equal_to_the_vocabulary_size_is_refused(tmp_path):
    assert load_written(small_manifest(placeholder_ids=(10, 11, 12, 99)), tmp_path / "last").placeholder_ids[-1] == 99
    with pytest.raises(ModelError, match=r"placeholder id 100 is outside the vocabulary"):
        load_written(small_manifest(placeholder_ids=(10, 11, 12, 100)), tmp_path / "over")
