"""SmartFreeze: growing with a pace controller (effective movement) and a participant selector that weighs
memory headroom, data (size and label balance) and measured speed (formula: SmartFreezeSelector).

Options: alpha, beta, gamma, explore (the selector's exponents and exploration share); selector = "smart"
(default) or "uniform" (uniform sampling among eligible devices: the ablation the benchmark compares against).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..selection import DeviceInfo, SmartFreezeSelector
from ..state import ServerState
from .base import Phase, Plan


@dataclass(frozen=True)
class SmartFreezeOptions:
    selector: Literal["smart", "uniform"] = "smart"
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.5
    explore: float = 0.1


class SmartFreeze(Plan):
    name = "smartfreeze"
    kinds = ("grow",)
    Options = SmartFreezeOptions

    def __init__(self, manifest, config):
        super().__init__(manifest, config)
        o = self.options
        if o.selector == "smart":
            self.selector = SmartFreezeSelector(o.alpha, o.beta, o.gamma, o.explore)

    def build_phases(self) -> list[Phase]:
        T = max(s.block for s in self.manifest.stages if s.kind == "grow") + 1
        return [Phase(f"grow-{t}") for t in range(T)]

    def candidates(self, devices: list[DeviceInfo], state: ServerState) -> list[DeviceInfo]:
        """Measured speeds (samples/s from earlier rounds) replace the prior; unseen devices keep the mean."""
        speed = state.plan_state.get("speed", {})
        mean = sum(speed.values()) / len(speed) if speed else 1.0
        pool = super().candidates(devices, state)
        for d in pool:
            d.speed = speed.get(str(d.id), mean)
        return pool
