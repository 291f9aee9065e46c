"""Open a Hugging Face checkpoint (local directory or hub id) and say plainly what is wrong with it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError
from .families import Family, family_of

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class Loaded:
    model: object  # a transformers PreTrainedModel in eval mode
    tokenizer: object  # a transformers fast tokenizer
    family: Family
    source: str
    gguf_file: str | None = None

    @property
    def kind(self) -> str:
        return self.family.kind

    @property
    def architecture(self) -> str:
        return self.family.architecture


def _is_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def _hub_error(source: str, exc: Exception) -> ExportError:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return ExportError(f"cannot fetch {source!r} from the Hugging Face hub, which cannot be reached from here or "
                       f"has no such model ({first}); pass a local directory written by save_pretrained instead")


def check_source(source: str, gguf_file: str | None = None) -> str:
    """A readable local checkpoint directory, or a hub id; anything else is a one-line error."""
    path = Path(source).expanduser()
    if _is_local(source):
        if not path.exists():
            raise ExportError(f"model directory {source} does not exist")
        if not path.is_dir():
            raise ExportError(f"{source} is a file; --model takes a directory written by save_pretrained or a hub id")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ExportError(f"cannot read model directory {source} (permission denied)")
        if gguf_file is None and not (path / "config.json").is_file():
            raise ExportError(f"{source} has no config.json: it is not a directory written by save_pretrained "
                              "(for a GGUF file, add --gguf-file NAME)")
        return str(path)
    if not HUB_ID.match(source):
        raise ExportError(f"{source!r} is neither an existing directory nor a Hugging Face hub id")
    return source


def check_gguf(source: str, gguf_file: str | None) -> dict:
    """Extra from_pretrained arguments for a GGUF checkpoint (transformers dequantises it to fp32)."""
    if gguf_file is None:
        return {}
    if Path(source).is_dir() and not (Path(source) / gguf_file).is_file():
        raise ExportError(f"{source} has no {gguf_file}")
    for module, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(module)
        except ImportError:
            raise ExportError(f"--gguf-file needs the {pkg} package: pip install 'bbt-onnx[gguf]'") from None
    return {"gguf_file": gguf_file}


def load_config(source: str, gguf: dict | None = None):
    from transformers import AutoConfig

    local = Path(source).is_dir()
    try:
        return AutoConfig.from_pretrained(source, **(gguf or {}))
    except (OSError, ValueError) as exc:
        if local:
            raise ExportError(f"cannot read the config in {source}: {str(exc).splitlines()[0][:200]}") from None
        raise _hub_error(source, exc) from None


def load_model(source: str, gguf_file: str | None = None) -> Loaded:
    source = check_source(source, gguf_file)
    gguf = check_gguf(source, gguf_file)
    family = family_of(load_config(source, gguf))
    arch = family.architecture
    import transformers

    cls = getattr(transformers, arch)
    try:
        model, info = cls.from_pretrained(source, attn_implementation="eager", output_loading_info=True, **gguf)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise ExportError(f"cannot load the weights in {source}: {str(exc).splitlines()[0][:200]}") from None
        raise _hub_error(source, exc) from None
    tied = ("decoder.bias", "lm_head.weight")  # tied to other weights, or filled from them
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k and not k.endswith(tied)]
    if missing:
        raise ExportError(f"{source} lacks weights the {arch} needs ({', '.join(missing[:4])}"
                          f"{' …' if len(missing) > 4 else ''}): it is not a {arch} checkpoint")
    model.eval()
    tokenizer = load_tokenizer(source, gguf)
    return Loaded(model, tokenizer, family, source, gguf_file)


def load_tokenizer(source: str, gguf: dict | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, use_fast=True, **(gguf or {}))
    except (OSError, ValueError, TypeError) as exc:
        raise ExportError(f"cannot load the tokenizer of {source}: {str(exc).splitlines()[0][:200]}") from None
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"the tokenizer of {source} has no fast (tokenizers) version; the runtime needs tokenizer.json")
    return tok
