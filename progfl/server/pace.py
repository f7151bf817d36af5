"""Effective movement (EM) and the rule that freezes the active block (ProFL point 3, SmartFreeze's pace).

EM_r = ||a_r - a_{r-W}||_1 / sum_{k=r-W+1..r} ||a_k - a_{k-1}||_1 on a fixed random sample of the active
block's trainable scalars: near 1 the weights still travel one way, near 0 they only oscillate. The authors'
exact rule is unpublished; ours freezes once the EM curve is flat and low, with a cap on rounds per stage.
The window opens with the stage's starting weights a_0, so EM_r exists from round W of the stage on.
"""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from progfl.manifest import ManifestError


@dataclass
class PaceConfig:
    """Settings of the pace controller; the authors used window 20 over far more rounds than we run."""

    window: int = 5  # W: EM compares a_r with a_{r-W}
    sample_size: int = 10_000  # scalars sampled from the active block
    slope_window: int = 5  # N: EM values the least-squares slope is fitted on
    slope_threshold: float = 0.02  # |slope| (EM per round) below which the curve counts as flat
    em_threshold: float = 0.3  # EM below which the block counts as converged
    min_rounds: int = 3  # never freeze earlier (a plan's phase may set its own, see plans.base.Phase)
    max_rounds: int = 30  # always freeze at this many rounds in a stage (a phase may set its own)

    def __post_init__(self) -> None:
        if self.window < 1 or self.slope_window < 2 or self.sample_size < 1:
            raise ValueError("pace: window >= 1, slope_window >= 2 and sample_size >= 1 are required")
        if not 1 <= self.min_rounds <= self.max_rounds:
            raise ValueError("pace: need 1 <= min_rounds <= max_rounds")


def effective_movement(history: Sequence[np.ndarray]) -> float:
    """EM over W+1 consecutive sampled vectors a_{r-W}..a_r; 0 when nothing moved."""
    if len(history) < 2:
        raise ValueError("effective_movement needs at least two vectors")
    a = [np.asarray(v, dtype=np.float64) for v in history]
    path = sum(float(np.abs(a[k] - a[k - 1]).sum()) for k in range(1, len(a)))
    if path == 0.0:
        return 0.0
    net = float(np.abs(a[-1] - a[0]).sum())
    return min(1.0, net / path)  # the triangle inequality bounds it by 1; min() absorbs rounding


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of values against 0, 1, 2, ... (change per round)."""
    y = np.asarray(values, dtype=np.float64)
    x = np.arange(len(y), dtype=np.float64) - (len(y) - 1) / 2
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def freeze_rule(ems: Sequence[float], rounds: int, cfg: PaceConfig, min_rounds: int | None = None,
                max_rounds: int | None = None) -> tuple[bool, str]:
    """The freezing decision from the EM values so far and the rounds spent in the stage. min_rounds/max_rounds
    override the config's for one stage (a ProFL shrinking step has its own cap); min is clipped to max."""
    hi = cfg.max_rounds if max_rounds is None else int(max_rounds)
    lo = min(cfg.min_rounds if min_rounds is None else int(min_rounds), hi)
    if rounds >= hi:
        return True, f"max_rounds: {rounds} rounds >= {hi}"
    if rounds < lo:
        return False, f"min_rounds: {rounds} rounds < {lo}"
    if len(ems) < cfg.slope_window:
        return False, f"warming up: {len(ems)} of {cfg.slope_window} EM values"
    s, last = slope(ems[-cfg.slope_window :]), ems[-1]
    if abs(s) < cfg.slope_threshold and last < cfg.em_threshold:
        return True, f"converged: |slope| {abs(s):.4f} < {cfg.slope_threshold}, EM {last:.4f} < {cfg.em_threshold}"
    return False, f"training: slope {s:.4f}, EM {last:.4f}"


class PaceController:
    """Tracks EM of the active block round by round and says when to freeze it (memory O(W x sample))."""

    def __init__(self, config: PaceConfig | None = None) -> None:
        self.config = config or PaceConfig()
        self.stage = ""
        self.seed = 0
        self.names: list[str] = []  # trainable arrays of the stage, sorted
        self.which = np.zeros(0, np.int64)  # per sampled scalar: index into names
        self.index = np.zeros(0, np.int64)  # per sampled scalar: flat index inside its array
        self.rounds = 0
        self.history: list[dict[str, Any]] = []  # per round in stage: {"round", "em"}
        self._window: deque[np.ndarray] = deque(maxlen=self.config.window + 1)

    @property
    def positions(self) -> list[tuple[str, int]]:
        """The sampled scalars as (array name, flat index) pairs."""
        return [(self.names[w], int(i)) for w, i in zip(self.which, self.index)]

    def start_stage(self, stage_name: str, trainable: dict[str, Any], seed: int = 0,
                    initial: dict[str, np.ndarray] | None = None) -> None:
        """Pick the stage's fixed sample (deterministic in seed and stage name) and forget the last stage.

        `trainable` maps the active block's array names to arrays or shapes. `initial` are the stage's starting
        weights a_0: they open the window, so EM_r is defined from round W of the stage on (without them, from
        round W+1)."""
        self.stage, self.seed = stage_name, int(seed)
        self.names = sorted(trainable)
        sizes = np.array([int(np.prod(_shape(trainable[n]))) for n in self.names], dtype=np.int64)
        total = int(sizes.sum())
        if total == 0:
            raise ManifestError(f"pace: stage {stage_name} has no trainable scalars")
        rng = np.random.default_rng([self.seed, zlib.crc32(stage_name.encode())])
        if total <= self.config.sample_size:
            flat = np.arange(total, dtype=np.int64)
        else:
            flat = np.sort(rng.choice(total, size=self.config.sample_size, replace=False)).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.which = (np.searchsorted(starts, flat, side="right") - 1).astype(np.int64)
        self.index = flat - starts[self.which]
        self.rounds = 0
        self.history = []
        self._window.clear()
        if initial is not None:
            self._window.append(self.sample(initial))

    def sample(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The sampled scalars of the given arrays, in float64."""
        parts = []
        for w, name in enumerate(self.names):
            if name not in arrays:
                raise ManifestError(f"pace: stage {self.stage} needs array {name}")
            parts.append(np.asarray(arrays[name]).reshape(-1)[self.index[self.which == w]])
        return np.concatenate(parts).astype(np.float64)

    def observe(self, arrays: dict[str, np.ndarray]) -> float | None:
        """Record one round's aggregated weights; EM once W+1 vectors (a_0 included) exist, else None."""
        if not self.names:
            raise ManifestError("pace: observe() before start_stage()")
        self._window.append(self.sample(arrays))
        self.rounds += 1
        em = effective_movement(self._window) if len(self._window) == self.config.window + 1 else None
        self.history.append({"round": self.rounds, "em": em})
        return em

    @property
    def ems(self) -> list[float]:
        return [h["em"] for h in self.history if h["em"] is not None]

    def should_freeze(self, min_rounds: int | None = None, max_rounds: int | None = None) -> tuple[bool, str]:
        """Whether to freeze the active block now, and which rule decided (min/max: this stage's, if not the
        config's)."""
        return freeze_rule(self.ems, self.rounds, self.config, min_rounds, max_rounds)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able values plus top-level numpy arrays: enough to continue exactly after a restart."""
        n = len(self.index)
        window = np.stack(list(self._window)) if self._window else np.zeros((0, n), np.float64)
        return {
            "config": asdict(self.config),
            "stage": self.stage,
            "seed": self.seed,
            "names": list(self.names),
            "which": self.which.copy(),
            "index": self.index.copy(),
            "rounds": self.rounds,
            "history": [dict(h) for h in self.history],
            "window": window,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = PaceConfig(**state["config"])
        self.stage, self.seed = state["stage"], int(state["seed"])
        self.names = list(state["names"])
        self.which = np.asarray(state["which"], dtype=np.int64).copy()
        self.index = np.asarray(state["index"], dtype=np.int64).copy()
        self.rounds = int(state["rounds"])
        self.history = [dict(h) for h in state["history"]]
        self._window = deque((np.array(v, dtype=np.float64) for v in state["window"]), maxlen=self.config.window + 1)


def _shape(value: Any) -> tuple[int, ...]:
    """An array's shape, or a shape given directly as a list/tuple of ints."""
    return tuple(value.shape) if hasattr(value, "shape") else tuple(int(d) for d in value)
