"""A KServe InferenceService for the repository `triton-repo` writes (`kserve`): KServe's stock Triton runtime
serving it over gRPC, scaled on requests in flight.

`inference_service` builds the manifest as plain data; `to_yaml` writes it. PyYAML is no dependency of ours, and
the manifest is small: every string is written double-quoted, with YAML's escapes for what is not printable, so no
value changes type on the way (a "1" stays a string, a name like "no" stays a name). The file goes into the
repository's root beside the model folders (`model_repository.SERVICE_MANIFEST`): tritonserver loads folders only,
and the manifest travels with the repository it serves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SettingsError

API_VERSION = "serving.kserve.io/v1beta1"
RUNTIME = "kserve-tritonserver"  # KServe's ClusterServingRuntime for Triton; it lists the model format triton
MODEL_FORMAT = "triton"  # a Triton model repository, served as it is
PROTOCOL = "v2"  # the KServe v2 inference protocol, which Triton and our client speak
# the runtime runs tritonserver with --grpc-port=9000; a container port named h2c is the one the platform routes
# as HTTP/2 without TLS (gRPC), instead of the runtime's HTTP port
GRPC_PORT = {"name": "h2c", "containerPort": 9000, "protocol": "TCP"}
# our configs are used as written, never completed by tritonserver (KServe appends these to the runtime's args)
RUNTIME_ARGS = ("--disable-auto-complete-config",)
GPU_RESOURCE = "nvidia.com/gpu"
# where KServe's storage initializer downloads a model from (an Azure blob is an https:// address)
STORAGE_SCHEMES = ("s3", "gs", "pvc", "https", "http", "hdfs", "webhdfs", "oci")
NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # a DNS-1035 label: KServe's rule for a service's name
NAME_LENGTH = 63


@dataclass(frozen=True)
class Service:
    """What the manifest says: the service's name, where the repository lies, and how it scales."""

    name: str
    storage_uri: str
    min_replicas: int = 1
    max_replicas: int = 1
    concurrency: int = 1  # requests in flight per replica the autoscaler aims at
    gpus: int = 0  # GPUs each replica asks for (a repository of GPU instances needs one)


def check_service_name(name: str, argument: str = "kserve") -> str:
    """A name KServe accepts for an InferenceService (it becomes DNS names and labels)."""
    if not isinstance(name, str) or len(name) > NAME_LENGTH or not NAME.fullmatch(name):
        raise SettingsError(f"{argument} {name!r} is not a Kubernetes name: lowercase letters, digits and '-', "
                            f"starting with a letter, ending with a letter or digit, at most {NAME_LENGTH} characters",
                            argument)
    return name


def check_storage_uri(uri: str, argument: str = "storage_uri") -> str:
    """An address KServe's storage initializer downloads from: one of its schemes, then a location, no spaces."""
    scheme, sep, rest = uri.partition("://") if isinstance(uri, str) else ("", "", "")
    if not (sep and scheme in STORAGE_SCHEMES and rest) or any(c.isspace() or not c.isprintable() for c in uri):
        schemes = ", ".join(f"{s}://" for s in STORAGE_SCHEMES)
        raise SettingsError(f"{argument} {uri!r} is not a location KServe downloads a model repository from: it "
                            f"starts with one of {schemes}, and names the uploaded folder that holds the model "
                            "folders", argument)
    return uri


def inference_service(service: Service) -> dict:
    """The InferenceService manifest as plain data (the order of the keys is the file's)."""
    model = {"modelFormat": {"name": MODEL_FORMAT}, "runtime": RUNTIME, "protocolVersion": PROTOCOL,
             "storageUri": service.storage_uri, "args": list(RUNTIME_ARGS), "ports": [dict(GRPC_PORT)]}
    if service.gpus:
        model["resources"] = {"limits": {GPU_RESOURCE: str(service.gpus)}}
    predictor = {"minReplicas": service.min_replicas, "maxReplicas": service.max_replicas,
                 "scaleMetric": "concurrency", "scaleTarget": service.concurrency, "model": model}
    return {"apiVersion": API_VERSION, "kind": "InferenceService", "metadata": {"name": service.name},
            "spec": {"predictor": predictor}}


PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9._/-]*")
# words YAML 1.1 reads as booleans or null: a key spelled so is quoted
YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _quoted(value)
    if value is None:
        return "null"
    if isinstance(value, (dict, list)) and not value:
        return "{}" if isinstance(value, dict) else "[]"
    raise TypeError(f"no YAML for {type(value).__name__}")


def _quoted(text: str) -> str:
    """A YAML double-quoted string: printable ASCII and printable non-ASCII as they are, the rest escaped."""
    def one(c: str) -> str:
        if c in '"\\':
            return "\\" + c
        if " " <= c <= "~" or (c >= "\xa0" and c.isprintable()):
            return c
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else \
            f"\\U{ord(c):08x}"

    return '"' + "".join(map(one, text)) + '"'


def _key(key: str) -> str:
    return key if PLAIN_KEY.fullmatch(key) and key.lower() not in YAML_WORDS else _quoted(key)


def _lines(value, pad: str):
    nested = (dict, list)
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, nested) and item:
                yield f"{pad}{_key(key)}:"
                yield from _lines(item, pad + "  ")
            else:
                yield f"{pad}{_key(key)}: {_scalar(item)}"
    else:
        for item in value:
            if isinstance(item, nested) and item:
                first, *rest = _lines(item, pad + "  ")
                yield f"{pad}- {first.lstrip()}"
                yield from rest
            else:
                yield f"{pad}- {_scalar(item)}"


def to_yaml(data: dict, comment: str = "") -> str:
    """YAML block text of plain data (dicts, lists, strings, ints, bools), the same for the same data; `comment`
    as `#` lines first."""
    head = [f"# {line}".rstrip() for line in comment.splitlines()]
    return "\n".join([*head, *_lines(data, "")]) + "\n"
