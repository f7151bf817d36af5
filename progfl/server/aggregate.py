"""Sample-weighted FedAvg as running sums: server memory stays O(model), not O(devices x model).

A bad update (missing or unknown array, wrong shape, NaN/Inf in the global dtype, no samples, wrong round or stage,
far from the global weights compared with the round's other updates, or pointing away from them) is dropped with a
one-line reason instead of poisoning the global model; the round survives. A device's self-reported sample count is capped by what the server
knows of it, so one claim cannot outweigh the fleet.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from progfl.manifest import ManifestError, ParamSpec, TrainUpdate

log = logging.getLogger("progfl.server")


class Aggregator:
    """Accumulates accepted updates of one round; `result()` is their sample-weighted average."""

    def __init__(
        self, expected: list[ParamSpec], min_updates: int = 1, round: int | None = None, stage: str | None = None
    ) -> None:
        self.expected = {p.name: tuple(p.shape) for p in expected}
        self.min_updates = min_updates
        self.round, self.stage = round, stage  # when set, updates for another round or stage are stale
        self.accepted = 0
        self.total_samples = 0
        self.dropped: list[tuple[int | str, str]] = []
        self.weights: dict[int | str, int] = {}  # each accepted update's weight: its samples, capped
        self._sums = {n: np.zeros(s, np.float64) for n, s in self.expected.items()}
        self._metric_sums: dict[str, float] = {}
        self._metric_weights: dict[str, float] = {}
        self._seen = 0

    def check(self, update: TrainUpdate) -> str | None:
        """Why this update cannot be averaged, or None if it can."""
        if self.round is not None and update.round != self.round:
            return f"stale: round {update.round}, expected {self.round}"
        if self.stage is not None and update.stage != self.stage:
            return f"wrong stage {update.stage!r}, expected {self.stage!r}"
        n = update.num_samples
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            return f"num_samples must be a positive integer, got {n!r}"
        if not isinstance(update.weights, dict):
            return "weights is not a dict of arrays"
        unknown = sorted(set(update.weights) - self.expected.keys())
        if unknown:
            return f"unknown array {unknown[0]}" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else "")
        for name, shape in self.expected.items():
            if name not in update.weights:
                return f"missing array {name}"
            a = np.asarray(update.weights[name])
            if a.shape != shape:
                return f"{name} has shape {list(a.shape)}, expected {list(shape)}"
            if a.dtype.kind not in "fiu":
                return f"{name} has non-numeric dtype {a.dtype}"
            if not np.isfinite(_as_global(a)).all():  # a float64 1e300 is finite until it becomes float32
                return f"{name} contains NaN or Inf (in the global dtype, float32)"
        return None

    def reject(self, update: TrainUpdate, device: int | str, reason: str) -> None:
        """Drop an update for a reason found outside check() (see distant_updates)."""
        self._seen += 1
        self.dropped.append((device, reason))
        log.warning("dropped update from device %s (round %s, stage %s): %s", device, update.round, update.stage, reason)

    def add(self, update: TrainUpdate, device: int | str | None = None, max_samples: int | None = None) -> str | None:
        """Validate and accumulate one update; None if accepted, else the reason it was dropped. max_samples: the count
        the server knows for this device (registered or assigned); a larger claim is capped to it."""
        who = device if device is not None else self._seen
        self._seen += 1
        reason = self.check(update)
        if reason is not None:
            self.dropped.append((who, reason))
            log.warning("dropped update from device %s (round %s, stage %s): %s", who, update.round, update.stage, reason)
            return reason
        w = int(update.num_samples)
        if max_samples is not None and w > max_samples:
            log.warning("device %s claimed %d samples, it has %d: weighted by %d", who, w, max_samples, max_samples)
            w = int(max_samples)
        self.weights[who] = w
        for name, acc in self._sums.items():
            acc += w * _as_global(np.asarray(update.weights[name])).astype(np.float64)
        for key, value in (update.metrics or {}).items():
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value):
                self._metric_sums[key] = self._metric_sums.get(key, 0.0) + w * float(value)
                self._metric_weights[key] = self._metric_weights.get(key, 0.0) + w
        self.accepted += 1
        self.total_samples += w
        return None

    def result(self) -> dict[str, np.ndarray] | None:
        """float32 weighted averages, or None with fewer than min_updates accepted (keep the old weights)."""
        if self.accepted < max(1, self.min_updates):
            return None
        return {n: (s / self.total_samples).astype(np.float32) for n, s in self._sums.items()}

    def metrics(self) -> dict[str, float]:
        """Sample-weighted means of the numeric metrics the accepted updates reported."""
        return {k: self._metric_sums[k] / self._metric_weights[k] for k in self._metric_sums}

    @staticmethod
    def merge(global_arrays: dict[str, np.ndarray], result: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """A new global model with the averaged arrays replaced (in the global dtype), all others untouched."""
        merged = dict(global_arrays)
        for name, value in (result or {}).items():
            if name not in global_arrays:
                raise ManifestError(f"aggregate: {name} is not an array of the global model")
            old = np.asarray(global_arrays[name])
            if old.shape != value.shape:
                raise ManifestError(f"aggregate: {name} has shape {list(value.shape)}, global {list(old.shape)}")
            merged[name] = (np.rint(value) if old.dtype.kind in "iu" else value).astype(old.dtype)
        return merged

    def summary(self) -> dict[str, Any]:
        """What the round log records about aggregation."""
        return {
            "accepted": self.accepted,
            "samples": self.total_samples,
            "dropped": [[who, why] for who, why in self.dropped],
        }


class SliceAverage:
    """HeteroFL's aggregation for sub-models: each element of a global array is the sample-weighted average of the
    updates whose slice holds it; an element no update of the round holds keeps its value. Running sums in float64
    over the global shapes: memory O(model), whatever the number of devices."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._weights: dict[str, np.ndarray] = {}

    def add(self, name: str, shape: tuple[int, ...], index: tuple[np.ndarray, ...], value: np.ndarray,
            weight: float) -> None:
        """One update's slice of global array `name` (of `shape`): `value` sits at np.ix_(*index)."""
        if name not in self._sums:
            self._sums[name] = np.zeros(shape, np.float64)
            self._weights[name] = np.zeros(shape, np.float64)
        at = np.ix_(*index)
        self._sums[name][at] += weight * _as_global(np.asarray(value)).astype(np.float64)
        self._weights[name][at] += weight

    def result(self, global_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The averaged arrays (float32), elements held by no update taken from `global_arrays`."""
        out = {}
        for name, sums in self._sums.items():
            w = self._weights[name]
            held = w > 0
            avg = np.asarray(global_arrays[name], np.float64).copy()
            avg[held] = sums[held] / w[held]
            out[name] = avg.astype(np.float32)
        return out


def _as_global(a: np.ndarray) -> np.ndarray:
    """An update's array in the global dtype (float32): values too large for it become Inf, which check() refuses."""
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(np.float32, copy=False)


def distant_updates(global_arrays: dict[str, np.ndarray], updates: list[tuple[int | str, TrainUpdate]],
                    names: list[str], k: float) -> dict[int | str, str]:
    """Updates whose distance from the global weights (L2 over `names`, float64) exceeds k x the median distance of
    the round's updates: device -> reason. A diverged or malicious device moves its weights far more than its peers;
    the median is robust to a minority of such. Fewer than 3 updates, k <= 0 or a zero median: nothing is dropped."""
    dist = {}
    for who, u in updates:
        try:
            dist[who] = math.sqrt(sum(float(np.sum((_as_global(np.asarray(u.weights[n])).astype(np.float64)
                                                     - np.asarray(global_arrays[n], np.float64)) ** 2)) for n in names))
        except (KeyError, ValueError, TypeError):  # malformed: check() drops it with its own reason
            continue
    finite = [d for d in dist.values() if math.isfinite(d)]
    if k <= 0 or len(finite) < 3:
        return {}
    median = float(np.median(finite))
    if median <= 0:
        return {}
    return {who: f"moved {d:.3g} from the global weights, more than {k:g} x the round's median {median:.3g}"
            for who, d in dist.items() if math.isfinite(d) and d > k * median}


def opposed_updates(global_arrays: dict[str, np.ndarray], updates: list[tuple[int | str, TrainUpdate]],
                    names: list[str]) -> dict[int | str, str]:
    """Updates whose weights (over `names`, float64) point away from the global weights: cosine <= 0. A round moves
    a model by a fraction of its norm, so an honest device's weights keep pointing the way of the global ones
    (cosine >= 0.74 in every round measured: 4 partitions x 8 rounds x 5 devices, lr up to 0.05); a sign-flipped
    model (w -> -w) has the opposite cosine, at a distance the median rule can miss (2.9-4.9 x the median
    measured, against k = 10). A global model of zeros says nothing: then nothing is dropped."""
    g = np.concatenate([np.asarray(global_arrays[n], np.float64).ravel() for n in names]) if names else np.zeros(0)
    g_norm = float(np.linalg.norm(g))
    if g_norm == 0.0:
        return {}
    out = {}
    for who, u in updates:
        try:
            w = np.concatenate([_as_global(np.asarray(u.weights[n])).astype(np.float64).ravel() for n in names])
        except (KeyError, ValueError, TypeError):  # malformed: check() drops it with its own reason
            continue
        w_norm = float(np.linalg.norm(w))
        if not math.isfinite(w_norm):
            continue
        cos = float(w @ g) / (w_norm * g_norm) if w_norm > 0 else 0.0
        if cos <= 0.0:
            out[who] = f"points away from the global weights (cosine {cos:.2f} <= 0)"
    return out
