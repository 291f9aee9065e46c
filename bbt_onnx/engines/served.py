"""The served contract: what a server publishes about a model and a client checks before scoring on it.

One module for both sides: the name a model is served under, the model-config parameters (fingerprint, request
limit, precision, row buckets), the access token's header, and the client directory a user of the service holds.
`bbt_onnx.serving` writes these; the Triton engine reads them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import SettingsError
from ..fileio import TOKEN_LIMIT, OutputKind, check_replaceable, only_files, read_text_bounded, write_dir
from ..manifest import MANIFEST_NAME, TOKENIZER_NAME, Manifest, load_manifest

TOKEN_HEADER = "triton-access-token"
GRPC_PREFIX = "triton-grpc-protocol-"  # tritonserver's name for a restricted-protocol key sent as gRPC metadata
FINGERPRINT_PARAM = "bbt_fingerprint"
LIMIT_PARAM = "bbt_max_request"
PRECISION_PARAM = "bbt_precision"
PROMPT_PARAM = "bbt_prompt_sha256"  # a served classifier's: the sha256 of the run's prompt file it was built from
LABELS_PARAM = "bbt_labels"  # a served classifier's label names, JSON
CLASSIFY_SUFFIX = ".classify"  # a served classifier's name: its model's, then this
CACHED_SUFFIX = ".cached"  # serve's model of rows after a shared prefix, on the cached pair
BUCKETS_PARAM = "bbt_row_buckets"  # calls per set of rows the server prefers: its device's `row_buckets`
DEFAULT_MAX_REQUEST = 1 << 18  # C x N x T per request: e.g. 20 prompts x 32 rows x 409 tokens
DEFAULT_MAX_PROMPTS = 256  # C per request
DEFAULT_MAX_LABELS = 64  # K per request
DEEP_SUFFIX = ".deep"


def served_name(manifest: Manifest, deep: bool = False) -> str:
    """The model's name on a server: the export source's last path component, in Triton's alphabet; its
    deep-prompt graph (BBTv2) is served beside it as NAME.deep."""
    base = Path(str(manifest.source).rstrip("/")).name or "model"
    name = ("".join(c if c.isalnum() or c in "._-" else "-" for c in base).strip(".-") or "model")[:100]
    return f"{name}{DEEP_SUFFIX}" if deep else name


def served_parameters(manifest: Manifest, precision: str, max_request: int, row_buckets: int) -> dict[str, str]:
    """The model-config parameters a server publishes and the Triton engine reads: one set for `bbt-onnx serve`
    and for `triton-repo`."""
    return {FINGERPRINT_PARAM: manifest.fingerprint(), LIMIT_PARAM: str(max_request), PRECISION_PARAM: precision,
            BUCKETS_PARAM: str(row_buckets)}


def request_limits(manifest: Manifest, deep: bool, max_request: int = DEFAULT_MAX_REQUEST,
                   max_prompts: int = DEFAULT_MAX_PROMPTS, max_labels: int = DEFAULT_MAX_LABELS) -> dict[str, str]:
    """What a served model checks in every request before running it (model-config parameters, beside
    `served_parameters`): the request size, the model's dims, the id range."""
    return {"bbt_max_request": str(max_request), "bbt_max_prompts": str(max_prompts),
            "bbt_max_labels": str(max_labels), "bbt_prompt_tokens": str(manifest.prompt_tokens),
            "bbt_hidden_size": str(manifest.hidden_size), "bbt_vocab_size": str(manifest.vocab_size),
            "bbt_max_positions": str(manifest.max_positions), "bbt_layers": str(manifest.num_layers),
            "bbt_deep": "1" if deep else "0"}


def max_body(manifest: Manifest, max_request: int = DEFAULT_MAX_REQUEST, max_prompts: int = DEFAULT_MAX_PROMPTS,
             max_labels: int = DEFAULT_MAX_LABELS) -> int:
    """The largest request body a valid request to this model needs, in bytes: ids and mask, the prompts, every
    layer's prompt, and the per-row and label inputs, with room for the protocol's own framing."""
    prompt = manifest.prompt_tokens * manifest.hidden_size * 4
    rows = min(max_request, 1 << 20)
    return 2 * 8 * max_request + (max_prompts + manifest.num_layers) * prompt + 2 * 8 * rows + 8 * max_labels + \
        (1 << 20)


def check_max_request(max_request: int) -> None:
    if isinstance(max_request, bool) or not (isinstance(max_request, int) and max_request >= 1):
        raise SettingsError(f"max_request must be a positive integer, got {max_request!r}", "max_request")


def read_token(path: str | Path) -> str:
    """The shared secret in a token file (its first line, without surrounding whitespace)."""
    try:
        text = read_text_bounded(path, TOKEN_LIMIT)
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read the token file {path}: {exc}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise SettingsError(f"the token file {path} is empty")
    if not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
        raise SettingsError(f"the token in {path} holds spaces, control or non-ASCII characters; a header carries "
                            "printable ASCII only")
    return token


def looks_like_client_dir(directory: Path) -> bool:
    return only_files(directory, lambda n: n in (MANIFEST_NAME, TOKENIZER_NAME), (MANIFEST_NAME,))


def write_client_dir(model_dir: str | Path, out: str | Path, force: bool = False, force_any: bool = False,
                     log=None) -> Path:
    """What a user of a remote service holds: the manifest (byte for byte, so its fingerprint is the server's)
    and the tokenizer; no graphs, no weights. `force` replaces an earlier client directory, `force_any` anything
    (never the model directory, nor a folder holding it)."""
    kind = OutputKind("a client directory (manifest.json and tokenizer.json)", looks_like_client_dir)
    inputs = [("model directory", Path(model_dir))]
    check_replaceable(out, force, kind, force_any, inputs)  # before the model is read
    manifest = load_manifest(model_dir)

    def fill(staging: Path) -> None:
        for name in (MANIFEST_NAME, TOKENIZER_NAME):
            shutil.copyfile(manifest.directory / name, staging / name)

    return write_dir(out, force, fill, kind, force_any, inputs, log)


def check_name(name: str, argument: str = "name") -> str:
    """A model name Triton accepts as a directory and a URL part; `argument` is what the caller calls it."""
    if not name or len(name) > 100 or not all(c.isalnum() or c in "._-" for c in name) or name[0] in ".-":
        raise SettingsError(f"{argument} {name!r} is not a model name: letters, digits, '.', '_' and '-', at most "
                            "100, not starting with '.' or '-'", argument)
    return name
