"""Plans driven with synthetic updates (no export, no devices): how phases end and how the round budget is used."""

from __future__ import annotations

import numpy as np
import pytest

from progfl.manifest import DeviceClass, Manifest, MemoryPoint, ParamSpec, Stage, TensorSpec, TrainUpdate
from progfl.server.pace import PaceConfig
from progfl.server.plans import PlanConfig, make_plan
from progfl.server.selection import DeviceInfo
from progfl.server.state import ServerState

T = 3  # blocks: ProFL's phases are grow-2, distill-2, grow-1, distill-1 (shrinking), grow-0, grow-1, grow-2


def stage(index: int, kind: str, block: int) -> Stage:
    name = "full" if kind == "full" else f"{kind}-{block}"
    if kind == "distill":
        params = [ParamSpec(f"basics.{block}.w", [4, 3])]
    elif kind == "full":
        params = [ParamSpec(f"blocks.{t}.w", [4, 3]) for t in range(T)]
    else:
        params = [ParamSpec(f"blocks.{block}.w", [4, 3]), ParamSpec("head.w", [2])]
    return Stage(index=index, name=name, kind=kind, block=block, loss="ce", loss_config={}, optimizer={}, inputs=[],
                 feature=TensorSpec("features", [-1, 1]), params=params, session_params={}, bn_updates={},
                 bn_variance={}, files={}, footprint={},
                 memory=[MemoryPoint(batch=1, measured_mb=10, estimate_mb=10),
                         MemoryPoint(batch=32, measured_mb=20, estimate_mb=20)])


def manifest() -> Manifest:
    kinds = [("grow", t) for t in range(T)] + [("distill", t) for t in range(1, T)] + [("full", 0)]
    stages = [stage(i, k, b) for i, (k, b) in enumerate(kinds)]
    names = [f"blocks.{t}.w" for t in range(T)] + [f"basics.{t}.w" for t in range(1, T)]
    return Manifest(model="toy", model_config={}, input_shape=[1, 4, 4], num_classes=2, opset=17, batch_size=32,
                    safety_margin=0.1, stages=stages, device_classes=[DeviceClass("any", 1000.0)],
                    global_params=[ParamSpec(n, [4, 3]) for n in names] + [ParamSpec("head.w", [2])])


DEVICES = [DeviceInfo(i, 500.0, 100, np.array([50, 50])) for i in range(4)]


def oscillate(initial, name, r):
    """Weights that hop around their starting point: EM falls to 0 once the window spans whole periods."""
    return initial[name] + np.float32(0.1 if r % 2 else -0.1)


def drift(initial, name, r):
    """Weights that keep travelling one way: EM stays 1."""
    return initial[name] + np.float32(0.1 * r)


def drive(plan_name, rounds, pace, options=None, updates=oscillate):
    m = manifest()
    plan = make_plan(plan_name, m, PlanConfig(rounds=rounds, per_round=2, pace=pace, options=options or {}))
    arrays = {p.name: np.full(p.shape, 0.5, np.float32) for p in m.global_params}
    state = ServerState(round=0, plan=plan.name, plan_state={}, arrays=arrays, pace={},
                        rng=np.random.default_rng(0).bit_generator.state, config={})
    plan.start(state)
    rng, records, phase_start = np.random.default_rng(1), [], {}
    while not plan.done(state):
        phase = state.plan_state["phase"]
        phase_start.setdefault(phase, {k: v.copy() for k, v in state.arrays.items()})  # a_0 of the phase
        r = state.plan_state["rounds_in_phase"] + 1
        results = [(d, TrainUpdate(task.round, task.stage, {n: updates(phase_start[phase], n, r)
                                                             for n in m.stage(task.stage).updated_names}, 10, {}))
                   for d, task in plan.configure_train(state, DEVICES, rng)]
        records.append(plan.aggregate_train(state, results))
    return plan, state, records


def segments(records):
    """(stage, rounds, reason of its last round) for each phase in order."""
    out = []
    for r in records:
        if not out or out[-1]["end"]:
            out.append({"stage": r["stage"], "rounds": 0, "end": False})
        out[-1]["rounds"] += 1
        out[-1]["reason"], out[-1]["end"] = r["freeze_reason"], r["froze"]
    return out


PACE = PaceConfig(window=2, slope_window=3, min_rounds=2, max_rounds=30)


def test_em_ends_profl_shrinking_steps_before_their_cap():
    # a_0, then +-0.1 around it: EM_2 = 1/3, then EM_3 = EM_4 = EM_5 = 0: flat and low at the 5th round of a step
    plan, state, records = drive("profl", 60, PACE, {"shrink_rounds": 8, "distill_rounds": 8})
    segs = segments(records)
    assert [s["stage"] for s in segs] == ["grow-2", "distill-2", "grow-1", "distill-1", "grow-0", "grow-1", "grow-2"]
    for s in segs[:4]:  # the shrinking steps
        assert s["end"] and s["reason"].startswith("converged") and s["rounds"] == 5 < 8, s
    assert records[0]["em"] is None and records[1]["em"] == pytest.approx(1 / 3)  # EM from round W = 2 on


def test_profl_shrinking_steps_stop_at_their_cap_when_em_stays_high():
    plan, state, records = drive("profl", 60, PACE, {"shrink_rounds": 5, "distill_rounds": 4}, updates=drift)
    segs = segments(records)
    assert [(s["stage"], s["rounds"]) for s in segs[:4]] == [("grow-2", 5), ("distill-2", 4), ("grow-1", 5),
                                                              ("distill-1", 4)]
    assert segs[0]["reason"] == "max_rounds: 5 rounds >= 5" and segs[1]["reason"] == "max_rounds: 4 rounds >= 4"


def test_profl_options_are_checked_and_min_rounds_clipped_to_the_cap():
    plan, _, _ = drive("profl", 1, PaceConfig(min_rounds=3, max_rounds=30), {"shrink_rounds": 2})
    assert plan.phases[0].limits(plan.config.pace) == (2, 2)  # min 3 clipped to the cap
    assert plan.phases[-1].limits(plan.config.pace) == (3, 30)  # growing: the pace's
    with pytest.raises(ValueError, match="shrink_rounds"):
        drive("profl", 1, PACE, {"shrink_rounds": 0})
    with pytest.raises(ValueError, match="shrink_share"):
        drive("profl", 1, PACE, {"shrink_share": 1.5})


@pytest.mark.parametrize("rounds,cap", [(100, 7), (40, 3), (8, 1), (1000, 30)])
def test_profl_shrinking_caps_default_to_a_share_of_the_budget(rounds, cap):
    """T=3: four shrinking steps share 30 % of the budget, at least 1 round and at most the pace's max_rounds."""
    plan = make_plan("profl", manifest(), PlanConfig(rounds=rounds, pace=PaceConfig(min_rounds=3, max_rounds=30)))
    shrink = [p for p in plan.phases[:2 * (T - 1)]]
    assert {p.limits(plan.config.pace)[1] for p in shrink} == {cap}
    assert sum(p.limits(plan.config.pace)[1] for p in shrink) <= max(0.3 * rounds, len(shrink))


@pytest.mark.parametrize("plan_name", ["profl", "smartfreeze", "exclusive", "fedavg"])
def test_last_phase_never_freezes_and_the_whole_budget_is_used(plan_name):
    # EM says "converged" and max_rounds (4) is passed: the last phase must still train to the end of the budget
    pace = PaceConfig(window=2, slope_window=3, min_rounds=2, max_rounds=4)
    plan, state, records = drive(plan_name, 30, pace, {"shrink_rounds": 4, "distill_rounds": 4} if plan_name == "profl" else {})
    assert state.round == 30 and [r["round"] for r in records] == list(range(1, 31))
    assert state.plan_state["phase"] == len(plan.phases) - 1
    last = [r for r in records if r["phase"] == len(plan.phases) - 1]
    assert len(last) > pace.max_rounds
    assert all(not r["froze"] and r["freeze_reason"].startswith("last phase") for r in last)
    assert last[-1]["round"] == 30


def test_budget_reserve_freezes_early_so_every_later_phase_gets_its_min_rounds():
    # 7 phases, min 2 rounds each, 18 rounds, EM never low: the first phase must yield after round 6, when the
    # 12 rounds left are exactly what the 6 later phases need
    plan, state, records = drive("profl", 18, PACE, {"shrink_rounds": 8, "distill_rounds": 8}, updates=drift)
    segs = segments(records)
    assert [s["rounds"] for s in segs] == [6, 2, 2, 2, 2, 2, 2]
    assert segs[0]["reason"] == "budget: 12 of 18 rounds left, the 6 later phases need 12 (their min rounds)"
    assert all(s["reason"].startswith("budget") for s in segs[1:-1])
    assert not segs[-1]["end"] and state.round == 18


def test_budget_too_small_for_every_phase_still_spends_exactly_the_budget():
    plan, state, records = drive("profl", 3, PACE, updates=drift)
    assert [r["round"] for r in records] == [1, 2, 3] and all(r["froze"] for r in records)
    assert all(r["freeze_reason"].startswith(("budget", "max_rounds: 1 rounds")) for r in records)  # caps of 1


@pytest.mark.parametrize("output_module,expected", [("conv", None), ("light", None), ("linear", 1e-3), (None, 1e-3)])
def test_profl_distills_at_the_plan_lr_unless_basic_layers_are_linear(output_module, expected):
    """Normalised basic layers distil stably at the training lr (measured); ProFL's linear ones (and exports made
    before kinds existed, which were linear) keep 1e-3. An explicit distill_lr always wins."""
    m = manifest()
    if output_module:
        m.model_config["output_module"] = output_module
    plan = make_plan("profl", m, PlanConfig(rounds=30))
    assert {p.lr for p in plan.phases if p.stage.startswith("distill")} == {expected}
    assert {p.lr for p in plan.phases if p.stage.startswith("grow")} == {None}
    plan = make_plan("profl", m, PlanConfig(rounds=30, options={"distill_lr": 0.02}))
    assert {p.lr for p in plan.phases if p.stage.startswith("distill")} == {0.02}
