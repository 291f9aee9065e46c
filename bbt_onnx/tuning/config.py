"""What a tune is asked to do (`TuneConfig`) and what it has done so far (`TunerState`): the two records a
checkpoint holds, apart from the loop that fills them, so that reading a checkpoint needs no tuner."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import losses
from ..baselines import AUTO
from ..choice import POLICY_KEYS
from ..cmaes import cma
from ..errors import SettingsError
from ..methods import METHODS
from ..options import setting
from ..subspace import PROJECTIONS
from ..verbalizer import VerbalizerSpec

TPA_DIMENSION = getattr(cma.evolution_strategy, "TPA_dimension", 300)  # pycma's own switch to TPA
MIN_LENGTH = 8  # max_length below this leaves no room for a template
SEARCH_CALIBRATIONS = ("off", "content-free", "batch")  # what the search's train loss is calibrated by
CALIBRATED_SEARCH = "content-free"  # what calibrate means for the search unless search_calibration says otherwise


@dataclass(frozen=True)
class TuneConfig:
    """The reference's defaults (the paper's settings for RoBERTa-large)."""

    prompt_tokens: int = setting(50, "Soft-prompt tokens P.")
    intrinsic_dim: int = setting(500, "Subspace dimension d.")
    popsize: int = setting(20, "CMA-ES population per generation.")
    budget: int = setting(8000, "API calls: one call = one candidate on the train set.")
    sigma: float = setting(1.0, "CMA-ES initial step size.")
    alpha: float = setting(1.0, "Scale of the normal projection.")
    random_proj: str = setting("normal", "How A is drawn: normal (the reference's scale) or uniform.",
                               choices=PROJECTIONS)
    bound: float = setting(0.0, "Box z to [-bound, bound]; 0 is off.")
    diagonal: bool = setting(False, "sep-CMA (diagonal covariance): far cheaper per generation.")
    loss: str = setting("ce", "What CMA-ES minimises on the train set.", choices=losses.LOSSES)
    eval_every: int = setting(100, "Score the best-so-far prompt on dev every N calls.")
    seed: int = setting(42, "One seed for sampling, the projection and CMA-ES.")
    checkpoint_every: int = setting(10, "Generations between checkpoints; 0 is off.")
    prompt_init: str | None = setting(AUTO, "What fills the prompt slots, so what z = 0 is: auto (the filler that "
                                      "scores best on dev at z = 0: the reference's ids, spaces, newlines or the "
                                      "template's words), reference (the paper's ids, for faithful runs), or text "
                                      "whose tokens fill them (its token count must equal --prompt-tokens).")
    max_length: int | None = setting(None, "Token limit per row [default: the model's].", minimum=MIN_LENGTH)
    method: str = setting("bbt", "bbt: one prompt on the embeddings; bbtv2: a prompt on every layer, one CMA-ES "
                          "per layer (needs a model exported with --deep).", choices=tuple(METHODS))
    patience: int = setting(0, "Stop after this many dev evaluations without a better dev metric; 0 is off (the "
                            "reference spends the whole budget).")
    calibrate: bool = setting(False, "Contextual calibration: divide out the label prior each prompt has on "
                              "content-free inputs (\"N/A\", \"\", \"[MASK]\"), for the plain baselines and the "
                              "tuned prompt alike.")
    search_calibration: str | None = setting(
        None, "With --calibrate, what CMA-ES's train loss sees: content-free (each candidate's prior on the "
        "content-free rows, scored in the same engine call as the training rows: three more rows a call), batch "
        "(each candidate's prior from its own training rows' mean probabilities, no more rows) or off (raw scores, "
        "the paper's search; calibration then only chooses on dev and corrects the result) [default: content-free "
        "with --calibrate, else off].", choices=SEARCH_CALIBRATIONS)

    verbalizer: str = setting("labels", "How a class is read: labels (its label word, the paper's readout) or auto[:K] "
                              "(K more words a class, 4 by default, chosen on the training rows from the model's "
                              "answers: a class then scores its words' summed probability).")

    def __post_init__(self):
        if self.search_calibration is None:  # resolved here, so that a run records what its search did
            object.__setattr__(self, "search_calibration", CALIBRATED_SEARCH if self.calibrate is True else "off")
        self.check()  # a config that cannot run is refused when it is built

    def check(self) -> None:
        """Every setting in range, before anything runs or touches disk (also done when the config is built)."""
        ints = {"prompt_tokens": 1, "intrinsic_dim": 1, "popsize": 2, "budget": 1, "eval_every": 1, "seed": 0,
                "checkpoint_every": 0, "patience": 0}
        for name, least in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise SettingsError(f"{name} must be a whole number, got {value!r}", name)
            if value < least:
                raise SettingsError(f"{name} must be at least {least}, got {value}", name)
        if self.seed >= 2**32:
            raise SettingsError(f"seed must be below 2**32, got {self.seed}", "seed")
        if self.max_length is not None and (isinstance(self.max_length, bool) or
                                            not isinstance(self.max_length, (int, np.integer))
                                            or self.max_length < MIN_LENGTH):
            raise SettingsError(f"max_length must be at least {MIN_LENGTH}, got {self.max_length!r}", "max_length")
        for name, positive in (("sigma", True), ("alpha", True), ("bound", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(value):
                raise SettingsError(f"{name} must be a finite number, got {value!r}", name)
            if value < 0 or (positive and value == 0):
                raise SettingsError(f"{name} must be {'positive' if positive else '0 (off) or positive'}, got "
                                    f"{value}", name)
        if self.popsize < 3 and self.intrinsic_dim >= TPA_DIMENSION:
            raise SettingsError(f"popsize {self.popsize} is too small at intrinsic_dim {self.intrinsic_dim}: from "
                                f"{TPA_DIMENSION} dimensions pycma's step-size control (TPA) spends two candidates "
                                "of every generation; use at least 3", ("popsize", "intrinsic_dim"))
        if self.budget < self.popsize:
            raise SettingsError(f"budget {self.budget} is smaller than popsize {self.popsize}: not even one "
                                "generation", ("budget", "popsize"))
        for name, choices in (("loss", losses.LOSSES), ("random_proj", PROJECTIONS), ("method", tuple(METHODS))):
            if getattr(self, name) not in choices:
                raise SettingsError(f"{name} {getattr(self, name)!r} is not one of {', '.join(choices)}", name)
        if self.search_calibration not in SEARCH_CALIBRATIONS:
            raise SettingsError(f"search_calibration {self.search_calibration!r} is not one of "
                                f"{', '.join(SEARCH_CALIBRATIONS)}", "search_calibration")
        if self.search_calibration != "off" and self.calibrate is not True:
            raise SettingsError(f"search_calibration {self.search_calibration} calibrates the search's scores: it "
                                "needs calibrate", ("search_calibration", "calibrate"))
        for name in ("diagonal", "calibrate"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name} must be true or false, got {getattr(self, name)!r}", name)
        if not isinstance(self.verbalizer, str):
            raise SettingsError(f"verbalizer must be text (labels or auto[:K]), got {self.verbalizer!r}", "verbalizer")
        VerbalizerSpec.parse(self.verbalizer)
        if self.prompt_init is not None and (not isinstance(self.prompt_init, str) or not self.prompt_init.strip()):
            raise SettingsError("prompt_init is empty; leave it out to choose the start on dev (auto)",
                                "prompt_init")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "TuneConfig":
        """The settings a run or checkpoint recorded; runs from before the run policy left the config recorded
        `choose` and `fallback` here (they now travel as `ChoicePolicy`), and runs from before the search could be
        calibrated searched raw scores."""
        return cls(**{"search_calibration": "off", **{k: v for k, v in doc.items() if k not in POLICY_KEYS}})


@dataclass
class TunerState:
    """Everything a resumed run needs to continue bit for bit: pycma's strategies (with our generator) and the
    loop's counters and best-so-far values. `checkpoint.dumps` writes it without pickle; `tuner.load_state` reads
    it back."""

    config: TuneConfig
    es: list[cma.CMAEvolutionStrategy]  # one per layer for BBTv2
    generation: int = 0
    calls: int = 0
    dev_calls: int = 0
    train_loss_initial: float = float("nan")
    best_z: np.ndarray | None = None
    best_loss: float = float("inf")
    best_dev_z: np.ndarray | None = None
    best_dev_metric: float = float("-inf")
    last_dev_z: np.ndarray | None = None
    last_dev_metric: float = float("nan")
    seconds: float = 0.0
    engine_seconds: float = 0.0
    optimizer_seconds: float = 0.0
    host_seconds: float = 0.0
    stop_reason: dict = field(default_factory=dict)
    prefix_z: np.ndarray | None = None  # BBTv2: [L, d], each layer at its best so far
    stale_evals: int = 0  # dev evaluations since the best dev metric last improved (patience)
