"""DepthFL (Kim, Yu, Kim, Moon, ICLR 2023): depth-scaled sub-models. Each device trains the deepest depth-k stage its
budget holds (blocks 0..k-1 with a classifier after each, mutual self-distillation between them: models/stages.py,
losses.depthfl); the server averages each array over the devices that trained it (SubModelPlan's SliceAverage, which
for these unsliced stages is a per-array sample-weighted average over the devices whose stage holds the array:
block j over the devices of depth > j, the heads over all of them). Arrays no device trained this round keep their
value.

BatchNorm: a depth stage trains whole blocks, so each block's running statistics are averaged over the same devices
as its weights (as FedAvg averages the full model's); the heads' BatchNorms track none (see StageSpec). The server
evaluates the global model as the full model, depth-T's inference graph: the deepest classifier, with the averaged
running statistics. (DepthFL's own evaluation also reports the ensemble of all classifiers; progfl's heads share
weights, and the evaluator runs one stage's inference graph, so the deepest classifier alone is reported.)
"""

from __future__ import annotations

from ...manifest import ManifestError, Stage
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

    def averaged_names(self, stage: Stage) -> list[str]:
        """What the device trained plus the running statistics of its blocks' BatchNorms."""
        return stage.updated_names
