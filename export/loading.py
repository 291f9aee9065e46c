"""Open a Hugging Face checkpoint (local directory or hub id) and say plainly what is wrong with it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
SUPPORTED = "RoBERTa masked LMs (RobertaForMaskedLM) and causal LMs (LlamaForCausalLM, GPT2LMHeadModel)"
# model_type -> (kind, architecture class name)
ARCHITECTURES = {
    "roberta": ("masked", "RobertaForMaskedLM"),
    "llama": ("causal", "LlamaForCausalLM"),
    "gpt2": ("causal", "GPT2LMHeadModel"),
}


@dataclass
class Loaded:
    model: object  # a transformers PreTrainedModel in eval mode
    tokenizer: object  # a transformers fast tokenizer
    kind: str
    architecture: str
    source: str
    gguf_file: str | None = None


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


def classify(config) -> tuple[str, str]:
    """(kind, architecture) for a supported config, else an error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    if model_type not in ARCHITECTURES:
        what = archs[0] if archs else f"model_type {model_type!r}"
        raise ExportError(f"{what} is not supported: bbt-onnx exports {SUPPORTED}")
    kind, arch = ARCHITECTURES[model_type]
    if archs and arch not in archs:
        raise ExportError(f"this checkpoint is a {archs[0]}, without the LM head BBT scores with: bbt-onnx exports "
                          f"{SUPPORTED}")
    return kind, arch


def load_model(source: str, gguf_file: str | None = None) -> Loaded:
    source = check_source(source, gguf_file)
    gguf = check_gguf(source, gguf_file)
    config = load_config(source, gguf)
    kind, arch = classify(config)
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
    return Loaded(model, tokenizer, kind, arch, source, gguf_file)


def load_tokenizer(source: str, gguf: dict | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, use_fast=True, **(gguf or {}))
    except (OSError, ValueError, TypeError) as exc:
        raise ExportError(f"cannot load the tokenizer of {source}: {str(exc).splitlines()[0][:200]}") from None
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"the tokenizer of {source} has no fast (tokenizers) version; the runtime needs tokenizer.json")
    return tok
