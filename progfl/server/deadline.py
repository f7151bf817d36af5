"""Stragglers: a per-round deadline, and the device speeds that make some devices late in `progfl simulate`.

Why a deadline: a synchronous round waits for its slowest participant, so in a heterogeneous fleet one slow phone
sets the pace of every round. A deadline D (seconds of device time; RunSettings.deadline) caps the wait: a device
whose round takes longer than D is dropped from that round, as on a real deployment where the server stops
waiting at D; its update is not aggregated, the round record lists it under `late` with its time, and the round
counts D seconds (the server waited that long). On Flower the deadline is the wall time the strategy waits for
the training replies (flower.py); in `progfl simulate` it is compared with each device's simulated time.

Why simulated times: `progfl simulate` runs every device on this machine, so measured times say nothing of a real
fleet's spread, and they are noisy (shared cores): a deadline on them would drop other devices in every run, and a
run resumed after Ctrl-C would differ from one run straight through. So each simulated device has a hidden speed
factor drawn from the run's seed, and its round takes a deterministic time from a cost model:

    seconds_d = epochs x samples_d x sample_seconds x cost(stage) / factor_d

- factor_d = exp(spread x z_d), z_d ~ N(0, 1) from the seed: a lognormal fleet whose median device has factor 1.
  Spread 0.5 (the default) puts about 5x between the 5th and the 95th percentile, the order of the speed spread
  reported for phones in cross-device FL; spread 0 makes every device equally fast.
- cost(stage) = the stage's training activations per sample (the manifest's footprint) over the largest stage's:
  a deterministic stand-in for a sample's forward+backward work. The frozen prefix is left out: the feature cache
  runs it once, not every epoch. Every stage of a ResNet costs the same under a FLOP count, so this proxy charges
  early blocks more than FLOPs would; it is a documented approximation, not a measurement.
- sample_seconds = what one sample-epoch of the largest stage takes on the median device.
The measured seconds are kept next to the simulated ones (`measured_seconds` in the round record).

The server never sees a factor: what it learns of a device's speed is the time of the device's earlier rounds
(measured_rates), exactly what a real server could measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..manifest import Manifest, TrainUpdate
from .selection import DeviceInfo


@dataclass
class Late:
    """A device dropped from a round for missing the deadline, as the round record lists it."""

    id: int
    seconds: float  # its round's device time; on Flower the wait until the deadline (a lower bound)
    samples: int  # the samples it trained on (the server's count): with `seconds`, its measured rate
    measured_seconds: float | None = None  # progfl simulate: the real compute time behind the simulated one


def check_deadline(deadline: float | None) -> None:
    """A deadline is None or a finite number of seconds > 0."""
    if deadline is not None and not (math.isfinite(deadline) and deadline > 0):
        raise ValueError(f"deadline must be a number of seconds > 0, got {deadline}")


def stage_cost(manifest: Manifest, stage: str) -> float:
    """A stage's work per sample relative to the manifest's largest stage (1.0 when the export has no footprint)."""
    def acts(name: str) -> float:
        return float(manifest.stage(name).footprint.get("activations_per_sample") or 0.0)

    top = max(acts(s.name) for s in manifest.stages)
    return acts(stage) / top if top > 0 and acts(stage) > 0 else 1.0


def speed_factors(seed: int, devices: int, spread: float) -> np.ndarray:
    """Each simulated device's hidden speed factor: lognormal, median 1, from the run's seed alone."""
    return np.exp(spread * np.random.default_rng([seed, 4]).standard_normal(devices))


def simulate_time(update: TrainUpdate, factor: float, cost: float, epochs: int, sample_seconds: float) -> None:
    """Replace the update's measured time by its simulated device time (module docstring); the measured one stays
    as `measured_seconds`, and `samples_per_s` becomes the rate the server would measure on that device."""
    work = epochs * update.num_samples
    seconds = work * sample_seconds * cost / factor
    update.metrics["measured_seconds"] = update.metrics.get("seconds")
    update.metrics["seconds"] = seconds
    update.metrics["samples_per_s"] = work / seconds if seconds > 0 else 0.0


def split_late(results: list[tuple[DeviceInfo, TrainUpdate]],
               deadline: float) -> tuple[list[tuple[DeviceInfo, TrainUpdate]], list[Late]]:
    """(on time, late): a result whose device time (metrics `seconds`) is over the deadline is late. A late device
    is credited with the samples the server registered for it (a larger claim is capped, as in aggregation)."""
    kept, late = [], []
    for d, u in results:
        seconds = u.metrics.get("seconds")
        if seconds is not None and seconds > deadline:
            samples = min(u.num_samples, d.num_samples) if d.num_samples > 0 else u.num_samples
            late.append(Late(d.id, float(seconds), samples, u.metrics.get("measured_seconds")))
        else:
            kept.append((d, u))
    return kept, late


def measured_rates(history: list[dict[str, Any]], manifest: Manifest, epochs: int) -> dict[int, float]:
    """Device id -> work per second (sample-epochs x stage cost / second) of its latest round the server timed,
    on time or late. Dividing by the stage's cost makes a rate measured on one stage predict another's time."""
    rates: dict[int, float] = {}
    for record in history:
        cost = stage_cost(manifest, record["stage"])
        for entry in [*record.get("devices", []), *record.get("late", [])]:
            seconds, samples = entry.get("seconds"), entry.get("samples")
            if seconds and samples:
                rates[int(entry["id"])] = epochs * samples * cost / float(seconds)
    return rates


__all__ = ["Late", "check_deadline", "measured_rates", "simulate_time", "speed_factors", "split_late", "stage_cost"]
