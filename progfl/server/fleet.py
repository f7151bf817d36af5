"""A fleet of devices with memory budgets, and what each can train.

ProFL's fleet: 100 devices with budgets drawn uniformly from 100..900 MB against full-model training at
840 MB, so ~7.6 % of devices hold the full model. Absolute MB depend on the engine and model, so progfl keeps
the shape, not the numbers: budgets uniform (stratified) between what the smallest stage needs and a ceiling chosen
so that `full_share` of the devices hold full-model training (both at their smallest micro-batch, as the manifest
sizes them). The floor is the progressive stages' alone: exporting the width baselines' stages too must not change
the fleet every plan is compared on.
"""

from __future__ import annotations

import numpy as np

from ..manifest import Manifest, ManifestError, predicted_peak_mb


PROGRESSIVE_KINDS = ("grow", "distill", "neulite")  # the fleet's floor: width stages (baselines) do not move it


def required_mb(manifest: Manifest, stage: str) -> float:
    """The smallest budget that lets a device take part in a stage (its smallest micro-batch plus the safety margin)."""
    s = manifest.stage(stage)
    return predicted_peak_mb(s, min(manifest.batch_size, s.min_micro_batch)) / (1.0 - manifest.safety_margin)


def profl_fleet(manifest: Manifest, n: int, rng: np.random.Generator, full_share: float = 0.08) -> list[float]:
    if not 0 < full_share < 1:
        raise ManifestError("full_share must be in (0, 1)")
    floor = ([s for s in manifest.stages if s.kind in PROGRESSIVE_KINDS]
             or [s for s in manifest.stages if s.kind != "full"])  # an export of the width baselines alone
    if not floor:
        raise ManifestError("the export has only the full model: nothing to be progressive about")
    low = min(required_mb(manifest, s.name) for s in floor)
    full = required_mb(manifest, "full")
    if full <= low:
        raise ManifestError("the full model needs no more memory than the smallest stage: nothing to be progressive about")
    high = (full - full_share * low) / (1.0 - full_share)  # P(budget >= full) = (high - full) / (high - low)
    # Stratified: one uniform draw in each of n equal slices of [0, 1), shuffled. Still uniform per device, but
    # the share that holds full-model training is full_share give or take one device: with 20 independent draws
    # at 8 %, one fleet in five would have no such device at all and ExclusiveFL nothing to train on.
    u = (np.arange(n) + rng.uniform(0.0, 1.0, n)) / n
    return [round(float(low + (high - low) * v), 1) for v in rng.permutation(u)]
