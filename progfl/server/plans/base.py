"""A plan: the order in which stages are trained, who trains each round, and when to move on.

Like a Flower strategy, a plan has paired steps: `configure_train` picks devices and writes their tasks,
`aggregate_train` folds the updates into the global arrays and decides whether the active block is done.
Concrete plans (ProFL, NeuLite, SmartFreeze, the baselines) mostly just declare their phases and selector.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ...manifest import Manifest, ManifestError, Stage, TrainTask, TrainUpdate
from ..aggregate import Aggregator, distant_updates, opposed_updates
from ..fleet import required_mb
from ..pace import PaceConfig, PaceController
from ..selection import DeviceInfo, Selector, StageSizer, UniformSelector, eligible
from ..settings import parse_settings
from ..state import ServerState


def task_seed(seed: int, round: int, device: int) -> int:
    """A device-round's seed (its shuffling and dropout): fixed by the run's seed, the round and the device alone."""
    return zlib.crc32(f"{seed}:{round}:{device}".encode())


@dataclass
class Phase:
    """One stretch of training on one stage.

    freeze='em': the pace controller ends it once effective movement says the block has converged, after at least
    `min_rounds` and at most `max_rounds` rounds (None: the pace config's; min_rounds is clipped to max_rounds).
    freeze='fixed': exactly `rounds` rounds.
    Whatever its kind, the plan's last phase is never frozen: it trains until the round budget is spent. Any other
    phase is frozen early (reason "budget") once the rounds left are needed to give every later phase its minimum.
    memory=False ignores budgets (FedAvg's upper bound)."""

    stage: str
    freeze: str = "em"
    rounds: int = 0
    memory: bool = True
    lr: float | None = None  # None: the plan's lr
    min_rounds: int | None = None  # 'em' only; None: PaceConfig.min_rounds
    max_rounds: int | None = None  # 'em' only; None: PaceConfig.max_rounds

    def limits(self, pace: PaceConfig) -> tuple[int, int]:
        """(least, most) rounds this phase trains unless the budget or its being last overrides them."""
        if self.freeze == "fixed":
            return self.rounds, self.rounds
        hi = pace.max_rounds if self.max_rounds is None else int(self.max_rounds)
        lo = pace.min_rounds if self.min_rounds is None else int(self.min_rounds)
        return min(lo, hi), hi


@dataclass
class PlanConfig:
    rounds: int = 40  # the round budget: every plan trains for exactly this many rounds
    per_round: int = 10
    lr: float = 0.01  # SGD, as ProFL's authors (momentum 0.9 and weight decay 5e-4 are set at export)
    epochs: int = 5  # local epochs per round, as ProFL's authors
    min_updates: int = 1
    outlier_k: float = 10.0  # drop an update farther from the global weights than k x the round's median (0: never)
    seed: int = 0
    pace: PaceConfig = field(default_factory=PaceConfig)
    options: dict[str, Any] = field(default_factory=dict)  # plan-specific settings: the plan's Options fields


@dataclass(frozen=True)
class NoOptions:
    """A plan without options: any --option is refused."""


class Plan(ABC):
    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]  # stage kinds the export must contain
    Options: ClassVar[type] = NoOptions  # the plan's --option keys, their types and defaults

    def __init__(self, manifest: Manifest, config: PlanConfig):
        self.manifest, self.config = manifest, config
        self.options = parse_settings(self.Options, config.options, f"plan {self.name} --option")
        missing = set(self.kinds) - {s.kind for s in manifest.stages}
        if missing:
            raise ManifestError(f"plan {self.name} needs stage kinds {sorted(missing)}: export with "
                                f"--stages {','.join(sorted(set(self.kinds)))}")
        self.phases = self.build_phases()
        if not self.phases:
            raise ValueError(f"plan {self.name}: no phases to train")
        for p in self.phases:
            if p.freeze not in ("em", "fixed"):
                raise ValueError(f"plan {self.name}: phase {p.stage} has freeze={p.freeze!r}, use 'em' or 'fixed'")
            lo, hi = p.limits(config.pace)
            if not 1 <= lo <= hi:
                raise ValueError(f"plan {self.name}: phase {p.stage} needs 1 <= min rounds <= max rounds, got {lo}..{hi}")
        # reserve[i]: the rounds phases i+1.. need at least (their min rounds); phase i yields to them
        mins = [p.limits(config.pace)[0] for p in self.phases]
        self.reserve = [sum(mins[i + 1:]) for i in range(len(mins))]
        self.pace = PaceController(config.pace)
        self.selector: Selector = UniformSelector()

    @abstractmethod
    def build_phases(self) -> list[Phase]: ...

    # ---- position in the plan (kept in ServerState.plan_state so a resumed run continues exactly) ----
    def start(self, state: ServerState) -> None:
        state.plan_state = {"phase": 0, "rounds_in_phase": 0}
        self._enter_phase(state)

    def done(self, state: ServerState) -> bool:
        """True once the round budget is spent: the last phase is never frozen, so the phases cannot run out
        first (the phase check only guards checkpoints written before that rule)."""
        return state.round >= self.config.rounds or state.plan_state["phase"] >= len(self.phases)

    def phase(self, state: ServerState) -> Phase:
        return self.phases[state.plan_state["phase"]]

    def stage(self, state: ServerState) -> Stage:
        return self.manifest.stage(self.phase(state).stage)

    def active_names(self, stage: Stage) -> list[str]:
        """The active block's trainable arrays: what EM watches."""
        prefix = {"grow": f"blocks.{stage.block}.", "neulite": f"blocks.{stage.block}.",
                  "distill": f"basics.{stage.block}."}.get(stage.kind, "")
        return [n for n in stage.trainable_names if n.startswith(prefix)]

    def _enter_phase(self, state: ServerState) -> None:
        state.plan_state["rounds_in_phase"] = 0
        if state.plan_state["phase"] < len(self.phases):
            stage = self.stage(state)
            active = {n: state.arrays[n] for n in self.active_names(stage)}
            # the stage's starting weights open the EM window: EM exists from round W of the stage on
            self.pace.start_stage(stage.name, active, self.config.seed, initial=active)
            state.pace = self.pace.state_dict()

    def check_fleet(self, devices: list[DeviceInfo]) -> None:
        """Refuse a fleet in which no device can hold any stage this plan trains under memory limits: every round
        would run without participants. Stages only some can hold are fine (they train with fewer devices)."""
        stages = {p.stage for p in self.phases if p.memory}
        if not stages or not devices:
            return
        m = self.manifest
        sizers = [StageSizer(m.stage(s), m.batch_size, m.safety_margin) for s in stages]  # 10,000 devices: cheap
        if not any(size(d).fits for size in sizers for d in devices):
            need = round(min(required_mb(m, s) for s in stages), 1)
            budgets = [d.budget_mb for d in devices]
            raise ValueError(f"plan {self.name}: no device of the fleet (budgets {min(budgets):g}..{max(budgets):g} MB) "
                             f"can hold any of its stages; the smallest needs {need:g} MB")

    # ---- configure / aggregate ----
    def candidates(self, devices: list[DeviceInfo], state: ServerState) -> list[DeviceInfo]:
        if not self.phase(state).memory:
            return list(devices)
        return eligible(devices, self.stage(state), self.manifest.batch_size, self.manifest.safety_margin)

    def configure_train(self, state: ServerState, devices: list[DeviceInfo],
                        rng: np.random.Generator) -> list[tuple[DeviceInfo, TrainTask]]:
        stage, phase, m = self.stage(state), self.phase(state), self.manifest
        pool = self.candidates(devices, state)
        chosen = self.selector.select(pool, stage, self.config.per_round, rng, m.batch_size, m.safety_margin)
        weights = {p.name: state.arrays[p.name] for p in stage.needed(m)}
        tasks = []
        for d in sorted(chosen, key=lambda d: d.id):
            if phase.memory:
                z = d.sizing(stage, m.batch_size, m.safety_margin)
                micro, accum = z.micro_batch, z.accum_steps
            else:
                micro, accum = m.batch_size, 1
            seed = task_seed(self.config.seed, state.round + 1, d.id)
            tasks.append((d, TrainTask(round=state.round + 1, stage=stage.name, manifest_sha256="", weights=weights,
                                       lr=phase.lr or self.config.lr, epochs=self.config.epochs,
                                       batch_size=m.batch_size, micro_batch=micro, accum_steps=accum, seed=seed,
                                       budget_mb=d.budget_mb)))
        return tasks

    def aggregate_train(self, state: ServerState, results: list[tuple[DeviceInfo, TrainUpdate]]) -> dict[str, Any]:
        """Average the accepted updates into the global arrays, then let the phase decide whether to move on."""
        stage = self.stage(state)
        expected = [p for p in stage.params if p.name in set(stage.updated_names)]
        agg = Aggregator(expected, self.config.min_updates, state.round + 1, stage.name)
        ordered = sorted(results, key=lambda r: r[0].id)  # a fixed order: sums do not depend on arrival
        self.admit(agg, ordered, state.arrays, [p.name for p in expected])
        result = agg.result()
        state.arrays = Aggregator.merge(state.arrays, result)
        state.round += 1
        record = {"round": state.round, "stage": stage.name, "phase": state.plan_state["phase"],
                  "participants": [d.id for d, _ in results], "dropped": [list(x) for x in agg.dropped],
                  "kept_previous": result is None, "train_loss": agg.metrics().get("loss")}
        record.update(self._advance(state, stage))
        return record

    def admit(self, agg: Aggregator, ordered: list[tuple[DeviceInfo, TrainUpdate]], reference: dict[str, np.ndarray],
              names: list[str]) -> list[tuple[DeviceInfo, TrainUpdate]]:
        """Add to `agg` the updates that pass its checks and the outlier rules (pointing away from `reference`, the
        global arrays as the updates' stage holds them, or far from it against the round's median, over `names`);
        the others are dropped with their reason. Returns the added ones, in order."""
        valid = [(d.id, u) for d, u in ordered if agg.check(u) is None]
        far = {**opposed_updates(reference, valid, names),
               **distant_updates(reference, valid, names, self.config.outlier_k)}
        added = []
        for d, u in ordered:
            if d.id in far:
                agg.reject(u, d.id, far[d.id])
            elif agg.add(u, d.id, max_samples=d.num_samples or None) is None:  # 0: the server knows no count
                added.append((d, u))
        return added

    def _advance(self, state: ServerState, stage: Stage) -> dict[str, Any]:
        i, phase = state.plan_state["phase"], self.phase(state)
        state.plan_state["rounds_in_phase"] += 1
        n = state.plan_state["rounds_in_phase"]
        em = self.pace.observe({name: state.arrays[name] for name in self.pace.names})
        if i == len(self.phases) - 1:
            froze, reason = False, f"last phase: trains until the round budget ({self.config.rounds}) is spent"
        elif phase.freeze == "em":
            froze, reason = self.pace.should_freeze(*phase.limits(self.config.pace))
        else:
            froze, reason = n >= phase.rounds, f"fixed: {n}/{phase.rounds} rounds"
        left, reserve = self.config.rounds - state.round, self.reserve[i]
        if not froze and i < len(self.phases) - 1 and left <= reserve:
            later = len(self.phases) - 1 - i
            froze, reason = True, (f"budget: {left} of {self.config.rounds} rounds left, " + (
                f"the {later} later phases need {reserve} (their min rounds)" if later > 1 else
                f"the last phase needs {reserve} (its min rounds)"))
        state.pace = self.pace.state_dict()
        if froze:
            state.plan_state["phase"] += 1
            self._enter_phase(state)
        return {"em": em, "froze": froze, "freeze_reason": reason}

    def restore(self, state: ServerState) -> None:
        """Continue from a checkpoint: the pace controller's window and sample come back as they were."""
        self.pace.load_state_dict(state.pace)
