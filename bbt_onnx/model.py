"""An exported model ready to use: its manifest, tokenizer and engine, loaded once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from .encoding import Encoder, load_tokenizer
from .engines import Engine, EngineSpec, OrtSpec
from .manifest import Manifest, load_manifest
from .tasks import Task


@dataclass
class Model:
    manifest: Manifest
    tokenizer: Tokenizer
    engine: Engine

    @classmethod
    def load(cls, directory: str | Path, engine: EngineSpec = OrtSpec(), deep: bool = False) -> "Model":
        """Open a directory written by `bbt-onnx export` on the engine `engine` names (onnxruntime here by default,
        or a server, for which the directory may be a client directory: manifest and tokenizer only); `deep` opens
        the deep-prompt graph (BBTv2). Another backend's engine plugs in as `Model(manifest, tokenizer, engine)`."""
        manifest = load_manifest(directory, graphs=engine.needs_graphs)
        return cls(manifest, load_tokenizer(manifest), engine.open(manifest, deep))

    def encoder(self, task: Task, prompt_tokens: int, max_length: int | None = None,
                placeholder_ids: Sequence[int] | None = None) -> Encoder:
        return Encoder(self.tokenizer, self.manifest, task, prompt_tokens, max_length, placeholder_ids)
