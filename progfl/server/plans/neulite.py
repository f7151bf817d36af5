"""NeuLite / ScaleFL: growing with the curriculum loss (CE - l1 nHSIC(Z,X) - l2 nHSIC(P,Y), weights set at export)
and co-adaptation of block t-1's last unit (both compiled into the neulite-t stages).

Options: order = "sequential" (default: each block until EM freezes it) or "round-robin" (the stages in turn,
one round each, for the whole round budget).
"""

from __future__ import annotations

from .base import Phase, Plan


class NeuLite(Plan):
    name = "neulite"
    kinds = ("neulite",)

    def build_phases(self) -> list[Phase]:
        T = max(s.block for s in self.manifest.stages if s.kind == "neulite") + 1
        if self.config.options.get("order", "sequential") == "round-robin":
            return [Phase(f"neulite-{r % T}", "fixed", 1) for r in range(self.config.rounds)]
        return [Phase(f"neulite-{t}") for t in range(T)]
