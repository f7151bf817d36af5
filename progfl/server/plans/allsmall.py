"""AllSmall: the whole fleet trains one sub-model, the widest its smallest device holds (the baseline that keeps every
device but shrinks the model for all). The choice is made from the devices known at the first round and kept (in the
checkpoint) for the run; when the smallest device holds no sub-model, the narrowest is trained by those that hold it.
The global model of this plan is that sub-model: it is what the server evaluates."""

from __future__ import annotations

import logging

from ...manifest import Stage
from ..selection import DeviceInfo
from ..state import ServerState
from .width import WidthPlan

log = logging.getLogger("progfl.server")


class AllSmall(WidthPlan):
    name = "allsmall"

    def candidates(self, devices: list[DeviceInfo], state: ServerState) -> list[DeviceInfo]:
        if "sub_model" not in state.plan_state and devices:
            smallest = min(devices, key=lambda d: (d.budget_mb, d.id))
            fits = [s for s in self.sub_models if self.sizing(smallest, s).fits]
            state.plan_state["sub_model"] = (fits[0] if fits else self.sub_models[-1]).name
            if not fits:
                log.warning("allsmall: the smallest device (%g MB) holds no sub-model: %s, the narrowest, is trained by "
                            "the devices that hold it", smallest.budget_mb, self.sub_models[-1].name)
        return super().candidates(devices, state)

    def stage(self, state: ServerState) -> Stage:
        return self.manifest.stage(state.plan_state.get("sub_model", "width-1"))

    def stage_for(self, device: DeviceInfo, state: ServerState) -> Stage | None:
        stage = self.stage(state)
        return stage if self.sizing(device, stage).fits else None
