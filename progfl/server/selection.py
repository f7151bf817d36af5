"""Who trains this round: only devices whose budget holds the stage, chosen uniformly or SmartFreeze-style."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from progfl.manifest import Sizing, Stage, size_stage


@dataclass(slots=True)  # a fleet holds one per device: no per-instance __dict__
class DeviceInfo:
    """What the server knows about a device; `speed` (samples/s) is refreshed with measured values.

    budget_mb is what training may use: on Flower, the node's memory minus `baseline_mb`, what its transport (the
    SuperNode and the ClientApp process) holds on the same board."""

    id: int
    budget_mb: float
    num_samples: int
    label_hist: np.ndarray  # sample count per class
    speed: float = 1.0
    backend: str = "ort"  # what it trains with: its stages are sized by that backend's peaks
    baseline_mb: float = 0.0

    def sizing(self, stage: Stage, batch: int, margin: float) -> Sizing:
        return size_stage(stage, self.budget_mb, batch, margin, backend=self.backend)


class Selector(Protocol):
    def select(
        self, devices: list[DeviceInfo], stage: Stage, k: int, rng: np.random.Generator, batch: int, margin: float
    ) -> list[DeviceInfo]: ...


class StageSizer:
    """`DeviceInfo.sizing` of one stage for a whole fleet, with a few size_stage calls instead of one per device
    (each ~0.1 ms: 10,000 devices would cost a second per look at the fleet, several times a round).

    Exact, not approximate: size_stage picks the largest micro-batch whose peak stays under budget x (1 - margin),
    so the pick only moves up as the budget grows. Two budgets sized alike enclose budgets sized alike too; only
    between two budgets sized differently is size_stage called, which finds every step in O(log fleet) calls. The
    known budgets live as long as this object: one look at the fleet, so a changed manifest is never missed."""

    def __init__(self, stage: Stage, batch: int, margin: float):
        self.stage, self.batch, self.margin = stage, batch, margin
        self._known: dict[str, tuple[list[float], list[Sizing]]] = {}  # backend -> sorted budgets, their sizing

    def __call__(self, device: DeviceInfo) -> Sizing:
        budgets, sizings = self._known.setdefault(device.backend, ([], []))
        b = device.budget_mb
        i = bisect_left(budgets, b)
        if i < len(budgets) and budgets[i] == b:
            return sizings[i]
        if 0 < i < len(budgets) and _same_pick(sizings[i - 1], sizings[i]):
            return replace(sizings[i], budget_mb=b)
        z = device.sizing(self.stage, self.batch, self.margin)
        budgets.insert(i, b)
        sizings.insert(i, z)
        return z


def _same_pick(a: Sizing, b: Sizing) -> bool:
    return (a.fits, a.micro_batch, a.accum_steps, a.peak_mb) == (b.fits, b.micro_batch, b.accum_steps, b.peak_mb)


def eligible(devices: list[DeviceInfo], stage: Stage, batch: int, margin: float) -> list[DeviceInfo]:
    """Devices whose budget holds the stage at some micro-batch: no one is handed what it cannot run."""
    sizing = StageSizer(stage, batch, margin)
    return [d for d in devices if sizing(d).fits]


class UniformSelector:
    """k devices uniformly at random, without replacement, among the eligible ones (all if fewer).
    memory=False skips the memory check: only for FedAvg's upper bound, which ignores budgets on purpose."""

    def __init__(self, memory: bool = True) -> None:
        self.memory = memory

    def select(
        self, devices: list[DeviceInfo], stage: Stage, k: int, rng: np.random.Generator, batch: int, margin: float
    ) -> list[DeviceInfo]:
        pool = eligible(devices, stage, batch, margin) if self.memory else list(devices)
        if k >= len(pool):
            return pool
        return [pool[i] for i in rng.choice(len(pool), size=max(k, 0), replace=False)]


class SmartFreezeSelector:
    """SmartFreeze's participant selector; the paper gives no formula, so this is our design.

    For each eligible device d (population P = the eligible devices of this stage):
        headroom  h_d = 1 - peak_d / budget_d  (peak at the micro-batch size_stage picks): room against
                        estimation error and an out-of-memory crash; also larger micro-batches, fewer steps
        share     s_d = n_d / mean_P(n)        (more samples: a lower-variance update)
        balance   b_d = 1 - TV(p_d, p_P)       (TV: total-variation distance of d's label distribution from
                        the pooled one; a representative device drifts the model less under non-IID data)
        pace      v_d = speed_d / mean_P(speed) (the round waits for its slowest participant)
        score_d   = h_d^alpha * (s_d * b_d)^beta * v_d^gamma   (each factor floored at 1e-3)
    Per-draw probabilities q_d = (1 - explore) * score_d / sum(score) + explore / |P|, so every eligible
    device keeps at least explore/|P| per draw (fairness, and fresh speed measurements); k devices are
    drawn without replacement (successive sampling) from q. Deterministic given rng.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, gamma: float = 0.5, explore: float = 0.1) -> None:
        if not 0.0 < explore <= 1.0:
            raise ValueError("SmartFreezeSelector: explore must be in (0, 1]")
        self.alpha, self.beta, self.gamma, self.explore = alpha, beta, gamma, explore

    def scores(self, pool: list[DeviceInfo], stage: Stage, batch: int, margin: float) -> np.ndarray:
        """score_d of each device of an eligible pool, in pool order."""
        floor = 1e-3
        sizer = StageSizer(stage, batch, margin)
        sizing = [sizer(d) for d in pool]
        head = np.array([1.0 - (z.peak_mb or 0.0) / d.budget_mb for z, d in zip(sizing, pool)])
        n = np.array([d.num_samples for d in pool], np.float64)
        share = n / n.mean() if n.mean() > 0 else np.ones(len(pool))
        width = max(len(d.label_hist) for d in pool)
        hists = np.zeros((len(pool), width))
        for i, d in enumerate(pool):
            hists[i, : len(d.label_hist)] = np.asarray(d.label_hist, np.float64)
        totals = hists.sum(1, keepdims=True)
        dist = np.divide(hists, totals, out=np.zeros_like(hists), where=totals > 0)
        pooled = hists.sum(0) / max(hists.sum(), 1e-12)
        balance = np.where(totals[:, 0] > 0, 1.0 - 0.5 * np.abs(dist - pooled).sum(1), 0.0)
        speed = np.array([d.speed for d in pool], np.float64)
        pace = speed / speed.mean() if speed.mean() > 0 else np.ones(len(pool))
        h, sb, v = (np.maximum(x, floor) for x in (head, share * balance, pace))
        return h**self.alpha * sb**self.beta * v**self.gamma

    def probabilities(self, pool: list[DeviceInfo], stage: Stage, batch: int, margin: float) -> np.ndarray:
        """Per-draw selection probability of each device of an eligible pool (the fairness floor included)."""
        s = self.scores(pool, stage, batch, margin)
        return (1.0 - self.explore) * s / s.sum() + self.explore / len(pool)

    def select(
        self, devices: list[DeviceInfo], stage: Stage, k: int, rng: np.random.Generator, batch: int, margin: float
    ) -> list[DeviceInfo]:
        pool = eligible(devices, stage, batch, margin)
        if k >= len(pool):
            return pool
        q = self.probabilities(pool, stage, batch, margin)
        return [pool[i] for i in rng.choice(len(pool), size=max(k, 0), replace=False, p=q)]
