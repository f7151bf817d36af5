"""NeuLite / ScaleFL: growing with the curriculum loss (CE - l1 nHSIC(Z,X) - l2 nHSIC(P,Y), weights set at export)
and co-adaptation of block t-1's last unit (both compiled into the neulite-t stages).

Options: order = "sequential" (default: each block until EM freezes it) or "round-robin" (the stages in turn,
one round each, for the whole round budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Phase, Plan


@dataclass(frozen=True)
class NeuLiteOptions:
    order: Literal["sequential", "round-robin"] = "sequential"


class NeuLite(Plan):
    name = "neulite"
    kinds = ("neulite",)
    Options = NeuLiteOptions

    def build_phases(self) -> list[Phase]:
        T = max(s.block for s in self.manifest.stages if s.kind == "neulite") + 1
        if self.options.order == "round-robin":
            return [Phase(f"neulite-{r % T}", "fixed", 1) for r in range(self.config.rounds)]
        return [Phase(f"neulite-{t}") for t in range(T)]
