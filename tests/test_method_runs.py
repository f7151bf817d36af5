"""Runs that exercise the methods (issue 13, part 4): real simulations through the round engine, each device-round
trained by the device runtime in its own process, checked against what methods.md documents.

- ProFL on a tiny CNN (3 blocks, 8x8 digits) with six devices of budgets derived from the manifest: every block is
  frozen by effective movement (EM), never by a cap or the round budget; the stage order is the plan's and the
  documented one (shrinking back to front, each block before its basic layer, then growing front to back); every
  device-round's measured peak is within its device's budget, and only devices whose budget holds the stage train.
- NeuLite in round-robin order: the stages come in turn, one round each, and the loss weights of the stages follow
  the documented schedule l1_t = l1 (T - t) / T, l2_t = l2 (t + 1) / T, recomputed here from the formula.

Why real runs and not synthetic updates (tests/test_plans.py drives plans with made-up weights): EM is only a
freezing signal if it falls on real training, and a peak is only within budget if a device measured it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from progfl.exporter import export_model
from progfl.manifest import DeviceClass, Manifest, size_stage
from progfl.models import build_model
from progfl.models.stages import NeuLiteWeights
from progfl.server.fleet import required_mb
from progfl.server.simulation import SimConfig, run_simulation

L1, L2 = 0.3, 0.2  # NeuLite's loss weights at export; not the defaults (0.1, 0.1), so a schedule ignoring them shows

# The pace controller, set so that EM decides on a tiny model within a few rounds (the defaults, window 5 and
# min_rounds 3 over runs of 40+ rounds, would not be reached in a test): EM over a window of 4 rounds, frozen once
# the last 3 EM values are flat (|least-squares slope| < 0.05 a round) and the last is below 0.5, not before a
# phase's 4th round. max_rounds 20 (and the shrinking steps' caps, shrink_rounds/distill_rounds, at 20) is above
# where EM froze every phase on this data (the 6th to 13th round of a phase, seed 1): a freeze by the cap would be
# the failure this test looks for, not a way to pass it.
PACE = {"window": 4, "slope_window": 3, "slope_threshold": 0.05, "em_threshold": 0.5, "min_rounds": 4,
        "max_rounds": 20}
CAPS = {"shrink_rounds": 20, "distill_rounds": 20}
PROFL_ROUNDS = 60  # 7 phases: the six EM freezes came by round 48; the budget's reserve would force one from round 52
PROFL_PER_ROUND = 2  # of the 5 devices that hold some stage: each round's average swings with its two devices' shards


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """The tiny CNN of tests/test_simulation.py (3 blocks, width 4, 8x8 grey), with ProFL's and NeuLite's stages."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("method_runs") / "a"
    export_model(build_model("cnn", 10, (1, 8, 8), width=4), folder, [DeviceClass("any", 4096.0)],
                 kinds=("grow", "distill", "neulite"), batch_size=16, measure_batches=[1, 16], backends=("ort",),
                 neulite=NeuLiteWeights(l1=L1, l2=L2))
    return folder


def fleet(manifest: Manifest) -> list[float]:
    """Six budgets derived from the manifest's measured peaks, so they keep their meaning when the runtime's baseline
    moves: one below every stage's measured peak (it holds nothing, and would go over budget if it trained), one
    between ProFL's smallest and largest stage needs, one just above ProFL's largest (below NeuLite's, whose projector
    costs more), and three that hold every stage."""
    need = {s.name: required_mb(manifest, s.name) for s in manifest.stages}
    profl = [v for n, v in need.items() if not n.startswith("neulite")]
    lowest_peak = min(p.measured_mb for s in manifest.stages for p in s.memory if p.measured_mb is not None)
    top = max(need.values())
    budgets = [0.8 * lowest_peak, (min(profl) + max(profl)) / 2, max(profl) + 0.3, top + 1.0, top + 10.0, top + 50.0]
    return [round(b, 1) for b in budgets]


def sim_config(artifacts: Path, out: Path, plan: str, **kw: Any) -> SimConfig:
    """Six devices of the fleet above, two label shards each (partition 'shards'): with few devices a round the global
    weights swing from round to round once a block has learnt what it can, which is what EM detects."""
    manifest = Manifest.load(artifacts)
    base = dict(plan=plan, artifacts=str(artifacts), out=str(out), dataset="digits", partition="shards", devices=6,
                per_round=3, lr=0.1, epochs=1, workers=2, seed=1, fleet=fleet(manifest))
    return SimConfig(**{**base, **kw})


def history(run: Path) -> dict[str, Any]:
    return json.loads((run / "history.json").read_text())


def segments(rounds: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The run's rounds cut into phases: a new phase starts after a round that froze."""
    out: list[list[dict[str, Any]]] = []
    for r in rounds:
        if not out or out[-1][-1]["froze"]:
            out.append([])
        out[-1].append(r)
    return out


def em_rule(ems: list[float], rounds: int, pace: dict[str, Any]) -> bool:
    """The documented freezing rule, written again here (not pace.freeze_rule): at least min_rounds rounds, and the
    least-squares slope of the last slope_window EM values flat and the last EM low."""
    n = pace["slope_window"]
    if rounds < pace["min_rounds"] or len(ems) < n:
        return False
    slope = np.polyfit(np.arange(n, dtype=np.float64), np.asarray(ems[-n:], dtype=np.float64), 1)[0]
    return abs(slope) < pace["slope_threshold"] and ems[-1] < pace["em_threshold"]


def check_memory(h: dict[str, Any], manifest: Manifest) -> None:
    """Every device-round has a measured peak within its device's budget (checked over the whole run first, so a
    device trained beyond its budget is reported as such); then: no failed job, and only devices whose budget holds
    the round's stage eligible and chosen (the eligible count recomputed from the fleet with size_stage)."""
    budgets = {d["id"]: d["budget_mb"] for d in h["fleet"]}
    rows = [(r["round"], r["stage"], d) for r in h["rounds"] for d in r["devices"]]
    assert rows, "nobody trained"
    for rnd, stage, d in rows:
        assert d["budget_mb"] == budgets[d["id"]]
        assert d["peak_mb"] is not None and d["peak_mb"] > 0, (rnd, d)
    over = [(rnd, stage, d["id"], d["peak_mb"], d["budget_mb"]) for rnd, stage, d in rows
            if d["peak_mb"] > d["budget_mb"] or d["over_budget"]]
    assert not over, f"measured peak over budget (round, stage, device, peak, budget): {over}"

    def fits(budget: float, stage: str) -> bool:
        return size_stage(manifest.stage(stage), budget, manifest.batch_size, manifest.safety_margin).fits

    for r in h["rounds"]:
        holders = {i for i, b in budgets.items() if fits(b, r["stage"])}
        assert r["failed"] == [], (r["round"], r["failed"])
        assert r["eligible"] == len(holders), (r["round"], r["stage"], r["eligible"], sorted(holders))
        assert set(r["selected"]) <= holders, (r["round"], r["stage"], r["selected"], sorted(holders))
        assert r["devices"], f"round {r['round']}: nobody trained"
    trained = {d["budget_mb"] for _, _, d in rows}
    assert len(trained) >= 3, f"devices of different budgets should train, saw {sorted(trained)}"


@pytest.fixture(scope="module")
def profl_run(artifacts, tmp_path_factory) -> tuple[SimConfig, dict[str, Any]]:
    """One ProFL run shared by the two ProFL tests (about 60 device-rounds' worth of processes: run it once)."""
    cfg = sim_config(artifacts, tmp_path_factory.mktemp("profl") / "run", "profl", rounds=PROFL_ROUNDS, pace=PACE,
                     options=CAPS, per_round=PROFL_PER_ROUND)
    return cfg, history(run_simulation(cfg, quiet=True))


def test_profl_freezes_every_block_by_effective_movement_within_every_budget(profl_run):
    """Each of the six freezes is the EM rule's (reason 'converged', and the rule recomputed from the logged EM values
    fires first at exactly that round), none by max_rounds or the round budget; the stages come in the plan's order;
    every device-round's measured peak is within its budget."""
    cfg, h = profl_run
    manifest, plan = cfg.check()
    segs = segments(h["rounds"])
    assert [s[0]["stage"] for s in segs] == [p.stage for p in plan.phases], [s[0]["stage"] for s in segs]
    assert len(segs) - 1 >= 3, "the run should change stage at least three times"
    assert [r["round"] for r in h["rounds"]] == list(range(1, PROFL_ROUNDS + 1))
    judged = 0  # rounds where EM was there to judge and said: keep training
    for seg in segs[:-1]:
        stage = seg[0]["stage"]
        assert all(r["stage"] == stage for r in seg), stage
        assert seg[-1]["froze"] and seg[-1]["freeze_reason"].startswith("converged:"), (stage, seg[-1])
        assert len(seg) < PACE["max_rounds"], (stage, len(seg))
        ems: list[float] = []
        for k, r in enumerate(seg, start=1):
            if r["em"] is not None:
                assert 0.0 <= r["em"] <= 1.0
                ems.append(r["em"])
            assert (r["em"] is not None) == (k >= PACE["window"]), "EM exists from the window's round on"
            assert em_rule(ems, k, PACE) == (k == len(seg)), (stage, k, ems)
            judged += k >= PACE["min_rounds"] and len(ems) >= PACE["slope_window"] and k < len(seg)
    assert judged >= 3, "EM never said 'keep training': the thresholds decide nothing"
    assert not any(r["freeze_reason"].startswith(("max_rounds", "budget")) for r in h["rounds"])
    assert all(not r["froze"] for r in segs[-1]), "the last phase trains until the round budget is spent"
    check_memory(h, manifest)
    budgets = sorted(d["budget_mb"] for d in h["fleet"])
    assert budgets[0] not in {d["budget_mb"] for r in h["rounds"] for d in r["devices"]}


def test_profl_phases_come_in_the_documented_order(profl_run, artifacts):
    """methods.md, ProFL: shrinking back to front (for t = T-1 .. 1: grow-t, then distill-t, the basic layer fitted
    to the real block), then growing front to back (grow-0 .. grow-(T-1)). Every phase trains at least one round,
    and the next phase starts only in the round after the previous one froze: a later block never trains before the
    earlier one is frozen."""
    _, h = profl_run
    manifest = Manifest.load(artifacts)
    T = len([s for s in manifest.stages if s.kind == "grow"])
    assert T == 3
    documented = [f"{kind}-{t}" for t in range(T - 1, 0, -1) for kind in ("grow", "distill")]
    documented += [f"grow-{t}" for t in range(T)]
    rounds = h["rounds"]
    order = [rounds[0]["stage"]] + [b["stage"] for a, b in zip(rounds, rounds[1:]) if b["stage"] != a["stage"]]
    assert order == documented
    for a, b in zip(rounds, rounds[1:]):
        if b["stage"] != a["stage"]:
            assert a["froze"], f"round {b['round']} trains {b['stage']} before {a['stage']} froze"
            assert b["phase"] == a["phase"] + 1
        else:
            assert not a["froze"] and b["phase"] == a["phase"]
    growing = [int(r["stage"].split("-")[1]) for r in rounds if r["phase"] >= 2 * (T - 1)]
    assert growing == sorted(growing) and set(growing) == set(range(T)), "growing goes front to back"
    shrinking = [r for r in rounds if r["phase"] < 2 * (T - 1)]
    assert [int(r["stage"].split("-")[1]) for r in shrinking] == sorted(
        (int(r["stage"].split("-")[1]) for r in shrinking), reverse=True), "shrinking goes back to front"


def neulite_weights(t: int, T: int) -> tuple[float, float]:
    """methods.md leaves l1_t, l2_t unpublished; progfl's documented default (README, `--neulite-l1/--neulite-l2`):
    block t gets l1 (T - t) / T and l2 (t + 1) / T, the input term fading and the label term growing."""
    return L1 * (T - t) / T, L2 * (t + 1) / T


def test_neulite_round_robin_takes_the_stages_in_turn_with_the_loss_schedule(artifacts, tmp_path):
    """order=round-robin: round r trains neulite-((r-1) mod T), one round each, for the whole budget; each stage's
    loss weights (what its graph was compiled with, recorded in the manifest) follow the schedule; every
    device-round stays within its budget."""
    manifest = Manifest.load(artifacts)
    T = len([s for s in manifest.stages if s.kind == "neulite"])
    assert T == 3
    rounds = 2 * T + 1
    cfg = sim_config(artifacts, tmp_path / "run", "neulite", rounds=rounds, options={"order": "round-robin"})
    h = history(run_simulation(cfg, quiet=True))
    got = [r["stage"] for r in h["rounds"]]
    assert got == [f"neulite-{(r - 1) % T}" for r in range(1, rounds + 1)], got
    for r in h["rounds"][:-1]:
        assert r["froze"] and r["freeze_reason"] == "fixed: 1/1 rounds", r
    assert not h["rounds"][-1]["froze"] and h["rounds"][-1]["freeze_reason"].startswith("last phase")
    schedule = []
    for t in range(T):
        cfg_t = manifest.stage(f"neulite-{t}").loss_config
        l1, l2 = neulite_weights(t, T)
        assert cfg_t["l1"] == pytest.approx(l1, rel=1e-12) and cfg_t["l2"] == pytest.approx(l2, rel=1e-12), (t, cfg_t)
        assert cfg_t["sigma"] == 5.0
        schedule.append((cfg_t["l1"], cfg_t["l2"]))
    l1s, l2s = zip(*schedule)
    assert list(l1s) == sorted(l1s, reverse=True) and len(set(l1s)) == T, "the input term fades block by block"
    assert list(l2s) == sorted(l2s) and len(set(l2s)) == T, "the label term grows block by block"
    assert schedule[0] == pytest.approx((L1, L2 / T)) and schedule[-1] == pytest.approx((L1 / T, L2))
    check_memory(h, manifest)
