"""The baselines users compare against: FedAvg where every device trains the full model (memory ignored: the
upper bound no real fleet reaches) and ExclusiveFL (FedAvg over only the devices that hold full training)."""

from __future__ import annotations

from ..selection import UniformSelector
from .base import Phase, Plan


class FedAvg(Plan):
    name = "fedavg"
    kinds = ("full",)

    def __init__(self, manifest, config):
        super().__init__(manifest, config)
        self.selector = UniformSelector(memory=False)

    def build_phases(self) -> list[Phase]:
        return [Phase("full", "fixed", self.config.rounds, memory=False)]


class Exclusive(Plan):
    name = "exclusive"
    kinds = ("full",)

    def build_phases(self) -> list[Phase]:
        return [Phase("full", "fixed", self.config.rounds)]
