"""Plans in which each device trains its own sub-model of the global model (SubModelPlan), and the width-scaled
baselines among them (HeteroFL, FedRolex, AllSmall): each device trains a whole sub-model, 1/d of every hidden layer's
width (the export's width-d stages, models/width.py), instead of one block of the whole width. DepthFL (depthfl.py)
is the other kind: the first k blocks at full width.

configure_train: each eligible device gets the sub-model stage `stage_for` gives it, with the global arrays cut to that
sub-model (manifest.Stage.take: the first channels, or FedRolex's window rolled by `offset`; a stage that slices
nothing takes its arrays whole). aggregate_train: each element of the global arrays becomes the sample-weighted average
of the updates that held it (aggregate.SliceAverage); elements no device held this round keep their value.

BatchNorm follows HeteroFL's static BatchNorm, statistics not tracked: devices still send the running statistics
their training graphs refresh, but the server never averages them (slices trained beside different neighbours have
statistics that describe no model), and the width stages' inference graphs normalise each evaluation batch by its own
statistics (norms.BatchStatNorm). The server evaluates in batches of 256 test samples.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np

from ...manifest import ManifestError, Sizing, Stage, TrainTask, TrainUpdate
from ..aggregate import Aggregator, SliceAverage
from ..fleet import required_mb
from ..selection import DeviceInfo, StageSizer, UniformSelector
from ..state import ServerState
from .base import Phase, Plan, task_seed



class SubModelPlan(Plan):
    """One fixed phase of the whole round budget on the largest sub-model (the global model: what the server
    evaluates); each device trains the sub-model stage `stage_for` gives it. Concrete plans list their sub-model stages
    (`sub_model_stages`, largest first), say where a slice's channels sit (`offset`) and which of a stage's arrays are
    averaged (`averaged_names`)."""

    kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, manifest, config):
        super().__init__(manifest, config)
        self.selector = UniformSelector(memory=False)  # the pool is already what each device can hold
        self._sizers: dict[str, StageSizer] = {}

    @abstractmethod
    def sub_model_stages(self) -> list[Stage]:
        """The sub-model stages, largest first (the first is the global model); raise ManifestError if it is missing."""

    def sizing(self, device: DeviceInfo, stage: Stage) -> Sizing:
        """device.sizing(stage), through one StageSizer per stage for the plan's life (its manifest never changes):
        each look at a fleet of 10,000 devices costs a few size_stage calls per sub-model, not 10,000."""
        if stage.name not in self._sizers:
            self._sizers[stage.name] = StageSizer(stage, self.manifest.batch_size, self.manifest.safety_margin)
        return self._sizers[stage.name](device)

    def build_phases(self) -> list[Phase]:
        self.sub_models = self.sub_model_stages()  # here: Plan.__init__ has checked the kinds, and needs the phases
        return [Phase(self.sub_models[0].name, "fixed", self.config.rounds)]

    def check_fleet(self, devices: list[DeviceInfo]) -> None:
        """Refuse a fleet in which no device holds even the smallest sub-model."""
        if devices and not any(self.sizing(d, s).fits for s in self.sub_models for d in devices):
            need = round(min(required_mb(self.manifest, s.name) for s in self.sub_models), 1)
            raise ValueError(f"plan {self.name}: no device of the fleet (budgets {min(d.budget_mb for d in devices):g}.."
                             f"{max(d.budget_mb for d in devices):g} MB) holds a sub-model; the smallest needs "
                             f"{need:g} MB")

    # ---- what the concrete plans decide ----
    def stage_for(self, device: DeviceInfo, state: ServerState) -> Stage | None:
        """The largest sub-model the device holds (HeteroFL's and DepthFL's rule), None if it holds none."""
        return next((s for s in self.sub_models if self.sizing(device, s).fits), None)

    def averaged_names(self, stage: Stage) -> list[str]:
        """The arrays of a stage's updates that are averaged into the global ones: the trained ones (running
        statistics are not averaged: see the width plans)."""
        return stage.trainable_names

    def offset(self, round: int) -> int:
        """Where the slices of `round` start along each cut axis: 0, HeteroFL's first channels."""
        return 0

    # ---- configure / aggregate ----
    def candidates(self, devices: list[DeviceInfo], state: ServerState) -> list[DeviceInfo]:
        return [d for d in devices if self.stage_for(d, state) is not None]

    def configure_train(self, state: ServerState, devices: list[DeviceInfo],
                        rng: np.random.Generator) -> list[tuple[DeviceInfo, TrainTask]]:
        m, r = self.manifest, state.round + 1
        chosen = self.selector.select(self.candidates(devices, state), self.stage(state), self.config.per_round, rng,
                                      m.batch_size, m.safety_margin)
        tasks = []
        for d in sorted(chosen, key=lambda d: d.id):
            stage = self.stage_for(d, state)
            z = self.sizing(d, stage)
            tasks.append((d, TrainTask(round=r, stage=stage.name, manifest_sha256="",
                                       weights=stage.take(state.arrays, m, self.offset(r)), lr=self.config.lr,
                                       epochs=self.config.epochs, batch_size=m.batch_size, micro_batch=z.micro_batch,
                                       accum_steps=z.accum_steps, seed=task_seed(self.config.seed, r, d.id),
                                       budget_mb=d.budget_mb)))
        return tasks

    def aggregate_train(self, state: ServerState, results: list[tuple[DeviceInfo, TrainUpdate]]) -> dict[str, Any]:
        """Per sub-model: the usual checks (aggregate.Aggregator) and outlier rules against the global arrays cut to
        it; then every accepted update's trained arrays into their places in the global ones."""
        m, r = self.manifest, state.round + 1
        groups: dict[str, list[tuple[DeviceInfo, TrainUpdate]]] = {}
        for d, u in sorted(results, key=lambda x: x[0].id):  # a fixed order: sums do not depend on arrival
            stage = self.stage_for(d, state)
            groups.setdefault(stage.name if stage else "", []).append((d, u))
        accepted: list[tuple[DeviceInfo, TrainUpdate, Stage, int]] = []  # + the update's weight
        dropped, losses = [], []
        for name, members in groups.items():
            stage = m.stage(name) if name else None
            if stage is None:  # the device no longer holds any sub-model (its budget changed on Flower)
                dropped += [(d.id, "holds no sub-model this round") for d, _ in members]
                continue
            expected = [p for p in stage.params if p.name in set(stage.updated_names)]
            agg = Aggregator(expected, 1, r, stage.name)
            cut = stage.take(state.arrays, m, self.offset(r))
            accepted += [(d, u, stage, agg.weights[d.id])
                         for d, u in self.admit(agg, members, cut, stage.trainable_names)]
            dropped += agg.dropped
            if "loss" in agg.metrics():
                losses.append((agg.metrics()["loss"], agg.total_samples))
        average = SliceAverage()
        for d, u, stage, w in sorted(accepted, key=lambda x: x[0].id):  # sums in device order, whatever the grouping
            for n in self.averaged_names(stage):
                whole = state.arrays[n].shape
                average.add(n, whole, stage.slice_index(n, whole, self.offset(r)), u.weights[n], w)
        kept = len(accepted) < max(1, self.config.min_updates)
        if not kept:
            state.arrays = Aggregator.merge(state.arrays, average.result(state.arrays))
        state.round += 1
        record = {"round": state.round, "stage": self.stage(state).name, "phase": state.plan_state["phase"],
                  "participants": [d.id for d, _ in results], "dropped": [list(x) for x in dropped],
                  "kept_previous": kept, "sub_models": {n: [d.id for d, _ in g] for n, g in groups.items() if n},
                  "train_loss": (sum(v * w for v, w in losses) / sum(w for _, w in losses)) if losses else None}
        record.update(self._advance(state, self.stage(state)))
        return record


class WidthPlan(SubModelPlan):
    """The width-scaled sub-models (width-1 first: the global model), HeteroFL's first channels unless `offset` says
    otherwise."""

    kinds = ("width",)

    def sub_model_stages(self) -> list[Stage]:
        widths = sorted((s for s in self.manifest.stages if s.kind == "width"), key=lambda s: s.block)  # widest first
        if widths[0].block != 1:
            raise ManifestError(f"plan {self.name} needs the full-width stage width-1: export with --stages width")
        return widths
