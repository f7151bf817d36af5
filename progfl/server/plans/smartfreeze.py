"""SmartFreeze: growing with a pace controller (effective movement) and a participant selector that weighs
memory headroom, data (size and label balance) and measured speed (formula: SmartFreezeSelector).

Options: alpha, beta, gamma, explore (the selector's exponents and exploration share); selector = "smart"
(default) or "uniform" (uniform sampling among eligible devices: the ablation the benchmark compares against).

Speed: what the server measured, never a simulated device's hidden factor: the time of each device's latest round
(on time or late) in the run's history, as work per second (deadline.measured_rates). Without a deadline the
selector's pace term weighs that rate against the pool's mean. Under a deadline D it weighs the share of its round
a device is predicted to finish in time, min(1, D / predicted seconds): being faster than the deadline gains
nothing, a device predicted to take twice the deadline scores 0.5^gamma of an on-time one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..deadline import measured_rates, stage_cost
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
        """The eligible devices, each with the speed the selector weighs (module docstring): measured rates from
        earlier rounds; a device not timed yet gets the mean rate, and with no device timed all are equal."""
        pool = super().candidates(devices, state)
        rates = measured_rates(state.history, self.manifest, self.config.epochs)
        if not rates:
            for d in pool:
                d.speed = 1.0
            return pool
        mean = sum(rates.values()) / len(rates)
        deadline = state.config.get("deadline")
        cost = stage_cost(self.manifest, self.stage(state).name)
        for d in pool:
            rate = rates.get(d.id, mean)
            work = self.config.epochs * d.num_samples * cost  # 0 when the server knows no sample count
            if deadline is None:
                d.speed = rate
            else:
                d.speed = min(1.0, deadline * rate / work) if work > 0 else 1.0
        return pool
