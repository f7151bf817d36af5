"""FedRolex (Alam et al., NeurIPS 2022): HeteroFL's sub-models and aggregation, but each layer's slice is a window
that rolls one channel further every round (round r holds channels r, r+1, ... modulo the layer's width), so every
channel of the global model gets trained by the small devices in turn, not only the first ones."""

from __future__ import annotations

from .width import WidthPlan


class FedRolex(WidthPlan):
    name = "fedrolex"

    def offset(self, round: int) -> int:
        return round
