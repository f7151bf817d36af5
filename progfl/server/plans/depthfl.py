"""DepthFL (Kim, Yu, Kim, Moon, ICLR 2023): depth-scaled sub-models. Each device trains the deepest depth-k stage its
budget holds (blocks 0..k-1 with a classifier after each, mutual self-distillation between them: models/stages.py,
losses.depthfl); the server averages each array over the devices that trained it (SubModelPlan's SliceAverage, which
for these unsliced stages is a per-array sample-weighted average over the devices whose stage holds the array:
block j over the devices of depth > j, the heads over all of them). Arrays no device trained this round keep their
value.

BatchNorm: a depth stage trains whole blocks, so each block's running statistics are averaged over the same devices
as its weights (as FedAvg averages the full model's); the heads' BatchNorms track none (see StageSpec).

What the server evaluates: the deepest classifier the fleet trains, depth-k's inference graph for the deepest k the
largest device holds (chosen from the devices known at the first round and kept in the checkpoint, as AllSmall's
sub-model). Blocks no device can hold never train: scoring the full model when nobody holds depth-T would score
their initial weights. (Measured: with ProFL's fleet shape on the accuracy benchmark's width-8 ResNet-18, depth-4
needs 90.3 MB with the margin, more than full training's 85.1, and the largest device has 85.2 MB: it holds depth-2.)
DepthFL's own evaluation also reports the ensemble of all classifiers; progfl's heads share weights and the
evaluator runs one stage's inference graph, so that one classifier is reported.
"""

from __future__ import annotations

from ...manifest import ManifestError, Stage
from ..selection import DeviceInfo
from ..state import ServerState
from .width import SubModelPlan


class DepthFL(SubModelPlan):
    name = "depthfl"
    kinds = ("depth",)

    def sub_model_stages(self) -> list[Stage]:
        depths = sorted((s for s in self.manifest.stages if s.kind == "depth"), key=lambda s: -s.block)  # deepest first
        blocks = {n.split(".")[1] for n in (p.name for p in self.manifest.global_params) if n.startswith("blocks.")}
        if depths[0].block != len(blocks):
            raise ManifestError(f"plan {self.name} needs the full-depth stage depth-{len(blocks)}: export with "
                                "--stages depth")
        return depths

    def candidates(self, devices: list[DeviceInfo], state: ServerState) -> list[DeviceInfo]:
        if "eval_stage" not in state.plan_state and devices:
            largest = max(devices, key=lambda d: (d.budget_mb, -d.id))
            held = [s for s in self.sub_models if self.sizing(largest, s).fits]
            state.plan_state["eval_stage"] = (held[0] if held else self.sub_models[0]).name
        return super().candidates(devices, state)

    def stage(self, state: ServerState) -> Stage:
        """The classifier the server evaluates (module docstring); depth-T until the fleet is known."""
        return self.manifest.stage(state.plan_state.get("eval_stage", self.sub_models[0].name))

    def averaged_names(self, stage: Stage) -> list[str]:
        """What the device trained plus the running statistics of its blocks' BatchNorms."""
        return stage.updated_names
