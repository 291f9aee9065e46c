"""The random subspace: a prompt of P x H numbers is A.z for z in R^d.

Pure functions. A is regenerated from the seed, never stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from .errors import SettingsError
from .seeding import seeds

PROJECTIONS = ("normal", "uniform")


@dataclass(frozen=True)
class ProjectionSpec:
    """Everything that determines A (shape [P*H, d]) bit for bit."""

    seed: int
    intrinsic_dim: int
    prompt_tokens: int
    hidden_size: int
    embedding_std: float
    alpha: float = 1.0
    sigma: float = 1.0
    kind: str = "normal"
    layer: int = 0  # BBTv2: which layer's projection; each layer draws its own A from the seed

    def __post_init__(self):
        if self.kind not in PROJECTIONS:
            raise SettingsError(f"random_proj {self.kind!r} is not one of {', '.join(PROJECTIONS)}", "random_proj")
        if self.intrinsic_dim < 1:
            raise SettingsError("intrinsic_dim must be at least 1", "intrinsic_dim")
        if self.sigma <= 0:
            raise SettingsError("sigma must be positive", "sigma")

    def to_json(self) -> dict:
        return asdict(self)


def normal_std(embedding_std: float, intrinsic_dim: int, alpha: float = 1.0, sigma: float = 1.0) -> float:
    """The reference's scale: with z ~ N(0, sigma^2 I), each prompt entry has std alpha * embedding_std."""
    return alpha * embedding_std / (np.sqrt(intrinsic_dim) * sigma)


def layer_specs(spec: ProjectionSpec, layer_std) -> list[ProjectionSpec]:
    """BBTv2's projections, one per layer: the same settings, each layer's own scale and random stream."""
    return [replace(spec, embedding_std=float(std), layer=i) for i, std in enumerate(layer_std)]


def build_projection(spec: ProjectionSpec) -> np.ndarray:
    """A^T as float32 [d, P*H], so that prompts = z @ A^T is one matmul per generation."""
    stream = seeds(spec.seed)["projection"]
    rng = np.random.default_rng(stream if spec.layer == 0 else [stream, spec.layer])
    shape = (spec.intrinsic_dim, spec.prompt_tokens * spec.hidden_size)
    if spec.kind == "normal":
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(normal_std(spec.embedding_std, spec.intrinsic_dim, spec.alpha, spec.sigma))
        return a
    bound = np.float32(1.0 / np.sqrt(spec.intrinsic_dim))
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def project(a_t: np.ndarray, z: np.ndarray, prompt_tokens: int) -> np.ndarray:
    """z [C, d] -> prompts [C, P, H] (float32)."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim == 1:
        z = z[None]
    return (z @ a_t).reshape(z.shape[0], prompt_tokens, -1)
