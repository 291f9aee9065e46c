"""An exported model ready to use: its manifest, tokenizer and engine, loaded once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from .encoding import Encoder, load_tokenizer
from .engine import Engine
from .engines import EngineSpec
from .manifest import Manifest, load_manifest
from .remote import Remote
from .tasks import Task


@dataclass
class Model:
    manifest: Manifest
    tokenizer: Tokenizer
    engine: Engine

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", precision: str = "fp32",
             threads: int | None = None, engine: Engine | None = None, deep: bool = False,
             remote: Remote | None = None) -> "Model":
        """Open a directory written by `bbt-onnx export`; `deep` opens its deep-prompt graph (BBTv2); pass
        `engine` to use another backend, or `remote` for the model served by Triton (the directory may then be a
        client directory: manifest and tokenizer only)."""
        manifest = load_manifest(directory, graphs=remote is None and engine is None)
        tokenizer = load_tokenizer(manifest)
        if engine is None:
            spec = EngineSpec(device, precision) if remote is None else EngineSpec.served(remote)
            engine = spec.open(manifest, threads, deep)
        return cls(manifest, tokenizer, engine)

    def encoder(self, task: Task, prompt_tokens: int, max_length: int | None = None,
                placeholder_ids: Sequence[int] | None = None) -> Encoder:
        return Encoder(self.tokenizer, self.manifest, task, prompt_tokens, max_length, placeholder_ids)
