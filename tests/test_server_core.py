"""Tests for the server core: effective movement and freezing, FedAvg, selection, checkpoints (fast)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from progfl.manifest import MemoryPoint, ParamSpec, Stage, TensorSpec, TrainUpdate
from progfl.server import (
    Aggregator,
    DeviceInfo,
    PaceConfig,
    PaceController,
    ServerState,
    SmartFreezeSelector,
    StateError,
    UniformSelector,
    effective_movement,
    eligible,
    freeze_rule,
    load_state,
    restore_rng,
    save_state,
    slope,
)


def reference_em(vectors):
    """EM by the formula, in plain Python (independent of the implementation)."""
    vs = [[float(x) for x in np.ravel(v)] for v in vectors]
    path = sum(sum(abs(a - b) for a, b in zip(vs[k], vs[k - 1])) for k in range(1, len(vs)))
    net = sum(abs(a - b) for a, b in zip(vs[-1], vs[0]))
    return 0.0 if path == 0 else net / path


# ---- effective movement ----


def test_em_monotone_is_one():
    assert effective_movement([np.full(4, k * 0.3) for k in range(6)]) == pytest.approx(1.0)


def test_em_oscillation_is_near_zero():
    x, y = np.array([0.0, 1.0]), np.array([1.0, -1.0])
    assert effective_movement([x, y] * 2 + [x]) == 0.0  # even window: back where it started
    assert effective_movement([x, y] * 10 + [x, y]) == pytest.approx(1 / 21)  # odd: one step net of 21


def test_em_hand_computed_cases():
    assert effective_movement([np.array([v]) for v in (0.0, 2.0, 1.0, 3.0)]) == pytest.approx(3 / 5)
    square = [np.array(p, float) for p in ((0, 0), (1, 0), (1, 1), (0, 1))]
    assert effective_movement(square) == pytest.approx(1 / 3)
    assert effective_movement([np.ones(3)] * 4) == 0.0  # no movement at all


def test_em_random_walks_in_unit_interval():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        w = int(rng.integers(1, 12))
        drift = rng.normal(size=5) * rng.uniform(0, 2)
        walk = np.cumsum(rng.normal(size=(w + 1, 5)) + drift, axis=0)
        em = effective_movement(list(walk))
        assert 0.0 <= em <= 1.0
        assert em == pytest.approx(reference_em(walk), rel=1e-9, abs=1e-12)


def test_slope_least_squares():
    assert slope([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert slope([0.0, 0.05, 0.1, 0.15, 0.2]) == pytest.approx(0.05)
    assert slope([3.0, 1.0, 3.0, 1.0]) == pytest.approx(-0.4)  # sum x(y - 2) = -2 over sum x^2 = 5


# ---- pace controller ----


def test_freeze_rule_flat_low_rising_high_and_cap():
    cfg = PaceConfig(slope_window=5, slope_threshold=0.02, em_threshold=0.3, min_rounds=3, max_rounds=30)
    assert freeze_rule([0.1, 0.11, 0.1, 0.09, 0.1], 10, cfg)[0]
    assert not freeze_rule([0.0, 0.05, 0.1, 0.15, 0.2], 10, cfg)[0]  # low but rising
    assert not freeze_rule([0.9] * 5, 10, cfg)[0]  # flat but still moving one way
    assert not freeze_rule([0.1] * 4, 10, cfg)[0]  # too few EM values for a slope
    assert not freeze_rule([0.1] * 5, 2, cfg)[0]  # before min_rounds
    fired, why = freeze_rule([0.9] * 5, 30, cfg)
    assert fired and why.startswith("max_rounds")


def test_controller_sample_is_fixed_and_bounded():
    shapes = {"w": (50, 40), "b": [40], "z": np.zeros((3, 3, 3))}
    a, b, c = (PaceController(PaceConfig(sample_size=300)) for _ in range(3))
    a.start_stage("grow-1", shapes, seed=3)
    b.start_stage("grow-1", shapes, seed=3)
    c.start_stage("grow-2", shapes, seed=3)
    pos = a.positions
    assert len(pos) == 300 and len(set(pos)) == 300
    assert pos == b.positions and pos != c.positions
    sizes = {"w": 2000, "b": 40, "z": 27}
    assert all(0 <= i < sizes[n] for n, i in pos)
    arrays = {"w": np.arange(2000.0).reshape(50, 40), "b": np.arange(40.0) * 2, "z": np.arange(27.0).reshape(3, 3, 3) * 3}
    expected = [float(arrays[n].reshape(-1)[i]) for n, i in pos]
    assert a.sample(arrays).tolist() == expected


def test_controller_em_matches_formula_and_freezes_on_oscillation():
    cfg = PaceConfig(window=4, slope_window=5, min_rounds=3, max_rounds=30)
    pc = PaceController(cfg)
    pc.start_stage("grow-0", {"w": (2, 3), "b": (3,)}, seed=0)
    x = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}
    y = {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)}
    decisions = []
    for r in range(1, 10):
        em = pc.observe(x if r % 2 else y)
        assert (em is None) == (r < 5)
        if em is not None:
            assert em == 0.0
        decisions.append(pc.should_freeze())
    assert not any(d[0] for d in decisions[:-1])
    assert decisions[-1][0] and decisions[-1][1].startswith("converged")
    assert [h["round"] for h in pc.history] == list(range(1, 10))


def test_controller_em_of_drift_and_cap():
    pc = PaceController(PaceConfig(window=3, slope_window=3, max_rounds=8))
    pc.start_stage("full", {"w": (4,)}, seed=1)
    rng = np.random.default_rng(0)
    seen = []
    for r in range(1, 9):
        seen.append((r + 0.1 * rng.normal(size=4)).astype(np.float32))  # drifting: EM stays high
        em = pc.observe({"w": seen[-1]})
        if r >= 4:
            assert em == pytest.approx(reference_em(seen[-4:]), rel=1e-9) and em > 0.5
        assert pc.should_freeze()[0] == (r == 8)
    assert pc.should_freeze() == (True, "max_rounds: 8 rounds >= 8")


def test_controller_em_from_the_stage_start():
    # the stage's starting weights open the window: with W = 3 the first EM is EM_3 = EM(a_0..a_3)
    pc = PaceController(PaceConfig(window=3, slope_window=2, min_rounds=1))
    a0 = {"w": np.zeros((2, 2), np.float32)}
    pc.start_stage("grow-1", a0, seed=0, initial=a0)
    steps = [np.full((2, 2), v, np.float32) for v in (1.0, 3.0, 2.0, 4.0)]
    ems = [pc.observe({"w": s}) for s in steps]
    assert ems[:2] == [None, None]
    assert ems[2] == pytest.approx(reference_em([a0["w"]] + steps[:3]))  # |2 - 0| / (1 + 2 + 1) = 0.5
    assert ems[2] == pytest.approx(0.5) and ems[3] == pytest.approx(reference_em(steps))
    # resume right after start_stage: a_0 travels in state_dict, so the copy gives the same EMs
    fresh, copy = PaceController(pc.config), PaceController()
    fresh.start_stage("grow-1", a0, seed=0, initial=a0)
    copy.load_state_dict(fresh.state_dict())
    assert [copy.observe({"w": s}) for s in steps] == ems and copy.history == pc.history


def test_divergence_streak_counts_rounds_with_participants_only():
    from progfl.server.divergence import Diverged, check_divergence, rejected_streak

    def rec(r, participants, dropped):
        return {"round": r, "stage": "grow-0", "participants": participants,
                "dropped": [[d, "w contains NaN or Inf"] for d in dropped]}

    ok, bad = (lambda r: rec(r, [1, 2], [2])), (lambda r: rec(r, [1, 2], [1, 2]))
    history = [ok(1), bad(2), rec(3, [], []), bad(4)]
    assert [r["round"] for r in rejected_streak(history)] == [2, 4]  # round 3 had nobody: neither counts nor breaks
    check_divergence(history, 3)  # only two
    with pytest.raises(Diverged) as err:
        check_divergence(history + [bad(5)], 3, lr=1e30, epochs=5)
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    for part in ("diverged", "rounds 2, 4, 5", "--lr", "--epochs", "normalised output module", "checkpoint"):
        assert part in msg, part
    check_divergence(history + [bad(5), ok(6)], 3)  # an accepted update ends the streak
    check_divergence([bad(r) for r in range(1, 10)], 0)  # 0: never stop


def run_walk(pc, rng, rounds):
    return [pc.observe({"w": rng.normal(size=(20, 5)).cumsum(0).astype(np.float32)}) for _ in range(rounds)]


def test_pace_state_dict_round_trip():
    pc = PaceController(PaceConfig(window=3, sample_size=40))
    pc.start_stage("grow-2", {"w": (20, 5)}, seed=9)
    run_walk(pc, np.random.default_rng(1), 6)
    sd = pc.state_dict()
    json.dumps({k: v for k, v in sd.items() if not isinstance(v, np.ndarray)})
    other = PaceController()
    other.load_state_dict(sd)
    assert other.positions == pc.positions and other.config == pc.config
    assert run_walk(other, np.random.default_rng(2), 5) == run_walk(pc, np.random.default_rng(2), 5)
    assert other.history == pc.history and other.should_freeze() == pc.should_freeze()


# ---- aggregation ----

SPECS = [ParamSpec("w", [2, 2]), ParamSpec("b", [2])]


def upd(w, b, n, metrics=None, rnd=1):
    return TrainUpdate(rnd, "grow-0", {"w": np.asarray(w, np.float32), "b": np.asarray(b, np.float32)}, n, metrics or {})


def test_fedavg_weighted_average():
    agg = Aggregator(SPECS)
    assert agg.add(upd(np.ones((2, 2)), [0, 1], 1, {"loss": 1.0, "acc": 0.5, "tag": "x"})) is None
    assert agg.add(upd(np.full((2, 2), 4.0), [2, -1], 3, {"loss": 2.0})) is None
    res = agg.result()
    assert res["w"].dtype == np.float32
    np.testing.assert_allclose(res["w"], np.full((2, 2), 3.25))  # (1*1 + 3*4) / 4
    np.testing.assert_allclose(res["b"], [1.5, -0.5])  # (0+6)/4, (1-3)/4
    assert agg.metrics() == pytest.approx({"loss": 1.75, "acc": 0.5})
    assert agg.accepted == 2 and agg.total_samples == 4


def test_bad_updates_dropped_round_survives(caplog):
    agg = Aggregator(SPECS, round=1)
    good = upd(np.ones((2, 2)), [1, 1], 2)
    nan = upd(np.full((2, 2), np.nan), [1, 1], 5)
    shape = TrainUpdate(1, "grow-0", {"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}, 5, {})
    unknown = TrainUpdate(1, "grow-0", {**good.weights, "extra": np.ones(1, np.float32)}, 5, {})
    missing = TrainUpdate(1, "grow-0", {"w": good.weights["w"]}, 5, {})
    zero = upd(np.ones((2, 2)), [1, 1], 0)
    stale = upd(np.ones((2, 2)), [1, 1], 5, rnd=0)
    with caplog.at_level(logging.WARNING, logger="progfl.server"):
        assert agg.add(good, device=7) is None
        reasons = [agg.add(u, device=i) for i, u in enumerate([nan, shape, unknown, missing, zero, stale])]
        assert agg.add(upd(np.full((2, 2), 4.0), [4, 4], 1), device=8) is None
    for reason, word in zip(reasons, ["NaN", "shape", "unknown", "missing", "num_samples", "stale"]):
        assert reason and word in reason and "\n" not in reason
    assert [d for d, _ in agg.dropped] == [0, 1, 2, 3, 4, 5]
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 6
    np.testing.assert_allclose(agg.result()["w"], np.full((2, 2), 2.0))  # (2*1 + 1*4) / 3
    np.testing.assert_allclose(agg.result()["b"], [2.0, 2.0])


def test_values_checked_in_the_global_dtype_and_claims_capped():
    """A float64 1e300 is finite until the global model's float32 makes it Inf: dropped. A device claiming 10^12
    samples is weighted by the 10 the server registered for it."""
    agg = Aggregator(SPECS)
    huge = TrainUpdate(1, "grow-0", {"w": np.full((2, 2), 1e300), "b": np.zeros(2)}, 5, {})
    inf = TrainUpdate(1, "grow-0", {"w": np.full((2, 2), np.inf, np.float32), "b": np.zeros(2, np.float32)}, 5, {})
    assert "NaN or Inf" in agg.add(huge, device=1) and "NaN or Inf" in agg.add(inf, device=2)
    assert agg.add(upd(np.ones((2, 2)), [1, 1], 10), device=3, max_samples=10) is None
    assert agg.add(upd(np.full((2, 2), 3.0), [3, 3], 10**12), device=4, max_samples=10) is None
    np.testing.assert_allclose(agg.result()["w"], np.full((2, 2), 2.0))  # (10*1 + 10*3) / 20, not ~3
    assert agg.total_samples == 20


def test_an_update_far_from_the_round_median_is_dropped():
    from progfl.server.aggregate import distant_updates

    rng = np.random.default_rng(0)
    glob = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    near = [(i, upd(rng.normal(0, 0.1, (2, 2)), rng.normal(0, 0.1, 2), 5)) for i in range(5)]
    far = (9, upd(np.full((2, 2), 50.0), [50, 50], 5))
    dropped = distant_updates(glob, [*near, far], ["w", "b"], k=10)
    assert list(dropped) == [9] and "more than 10 x the round's median" in dropped[9]
    assert distant_updates(glob, [*near, far], ["w", "b"], k=0) == {}  # the setting off
    assert distant_updates(glob, [near[0], far], ["w", "b"], k=10) == {}  # two updates: no median to trust
    # just inside k x median stays: the rule is relative, not a fixed radius
    median = float(np.median([np.sqrt(sum(float(np.sum(u.weights[n].astype(np.float64) ** 2)) for n in "wb"))
                              for _, u in near]))
    edge = (8, upd(np.full((2, 2), 0.99 * 10 * median / np.sqrt(6)), np.full(2, 0.99 * 10 * median / np.sqrt(6)), 5))
    assert 8 not in distant_updates(glob, [*near, edge], ["w", "b"], k=10)


def test_a_sign_flipped_model_is_dropped_whatever_its_distance():
    """w -> -w lands at about 2|g| from the global weights: within 10 x the median when honest rounds move far
    (early rounds); its cosine with the global weights is what gives it away."""
    from progfl.server.aggregate import distant_updates, opposed_updates

    rng = np.random.default_rng(1)
    glob = {"w": rng.normal(0, 1, (2, 2)).astype(np.float32), "b": rng.normal(0, 1, 2).astype(np.float32)}
    honest = [(i, upd(glob["w"] + rng.normal(0, 0.5, (2, 2)), glob["b"] + rng.normal(0, 0.5, 2), 5)) for i in range(4)]
    flipped = (9, upd(-honest[0][1].weights["w"], -honest[0][1].weights["b"], 5))
    dropped = opposed_updates(glob, [*honest, flipped], ["w", "b"])
    assert list(dropped) == [9] and "points away from the global weights (cosine -" in dropped[9]
    assert 9 not in distant_updates(glob, [*honest, flipped], ["w", "b"], k=10)  # what the distance rule misses
    zero = {n: np.zeros_like(a) for n, a in glob.items()}
    assert opposed_updates(zero, [*honest, flipped], ["w", "b"]) == {}  # no direction to compare with


def test_too_few_updates_gives_none_and_merge():
    agg = Aggregator(SPECS, min_updates=2)
    assert agg.result() is None
    agg.add(upd(np.ones((2, 2)), [1, 1], 2))
    assert agg.result() is None
    agg.add(upd(np.ones((2, 2)), [3, 3], 2))
    glob = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32), "stem": np.arange(3.0)}
    merged = Aggregator.merge(glob, agg.result())
    assert merged["stem"] is glob["stem"] and glob["b"].tolist() == [0, 0]
    assert merged["b"].tolist() == [2.0, 2.0] and merged["w"].tolist() == [[1, 1], [1, 1]]
    assert Aggregator.merge(glob, None) == glob


# ---- selection ----


def tiny_stage():
    """Peak = 80 + 2.5 x micro-batch (from the two measured points)."""
    return Stage(index=0, name="grow-0", kind="grow", block=0, loss="ce", loss_config={}, optimizer={}, inputs=[],
                 feature=TensorSpec("features", [-1, 1]), params=[ParamSpec("w", [1])], session_params={},
                 bn_updates={}, bn_variance={}, files={}, footprint={},
                 memory=[MemoryPoint(batch=8, measured_mb=100, estimate_mb=100),
                         MemoryPoint(batch=32, measured_mb=160, estimate_mb=160)])


def dev(i, budget, hist=(50, 50), n=100, speed=1.0):
    return DeviceInfo(i, budget, n, np.array(hist), speed)


def test_eligible_and_uniform_never_pick_ineligible():
    stage = tiny_stage()
    # micro-batch 1 needs 82.5 MB <= budget x 0.9, i.e. budget >= 91.67
    budgets = [50, 80, 91, 91.6, 91.7, 92, 100, 200, 500, 1000]
    devices = [dev(i, b) for i, b in enumerate(budgets)]
    ok = {d.id for d in eligible(devices, stage, 32, 0.1)}
    assert ok == {i for i, b in enumerate(budgets) if b >= 82.5 / 0.9}
    rng = np.random.default_rng(0)
    picked = set()
    for _ in range(300):
        chosen = UniformSelector().select(devices, stage, 3, rng, 32, 0.1)
        assert len(chosen) == 3 and len({d.id for d in chosen}) == 3
        picked |= {d.id for d in chosen}
    assert picked == ok
    assert {d.id for d in UniformSelector().select(devices, stage, 50, rng, 32, 0.1)} == ok


def test_smartfreeze_probabilities_match_hand_computation():
    stage = tiny_stage()
    # A: budget 1000, micro 32, peak 160 -> headroom 0.84; B: budget 110 (limit 99), micro 4, peak 90
    # pooled labels of A, B, C: [200, 100] / 300 -> balance 5/6 for [50, 50], 2/3 for [100, 0]
    devices = [dev(0, 1000), dev(1, 110), dev(2, 1000, hist=(100, 0)), dev(3, 60)]
    scores = [0.84 * 5 / 6, (1 - 90 / 110) * 5 / 6, 0.84 * 2 / 3]
    expected = [0.9 * s / sum(scores) + 0.1 / 3 for s in scores]
    sel = SmartFreezeSelector(alpha=1, beta=1, gamma=0, explore=0.1)
    pool = eligible(devices, stage, 32, 0.1)
    np.testing.assert_allclose(sel.probabilities(pool, stage, 32, 0.1), expected, rtol=1e-9)
    rng = np.random.default_rng(5)
    counts = np.zeros(4)
    for _ in range(8000):
        (d,) = sel.select(devices, stage, 1, rng, 32, 0.1)
        counts[d.id] += 1
    freq = counts / counts.sum()
    np.testing.assert_allclose(freq[:3], expected, atol=0.02)  # 4 standard errors
    assert counts[3] == 0  # 60 MB cannot hold the stage
    assert freq[0] > freq[2] > freq[1]  # headroom and label balance are preferred


def test_smartfreeze_fair_and_deterministic():
    stage = tiny_stage()
    rng0 = np.random.default_rng(0)
    devices = [dev(i, float(rng0.uniform(40, 900)), hist=rng0.integers(0, 50, 10), n=int(rng0.integers(5, 500)),
                   speed=float(rng0.uniform(0.2, 5))) for i in range(30)]
    devices.append(dev(99, 92, hist=[1] + [0] * 9, n=1, speed=0.01))  # worst on every factor, still eligible
    ok = {d.id for d in eligible(devices, stage, 32, 0.1)}
    sel = SmartFreezeSelector()
    rng = np.random.default_rng(1)
    picked = set()
    for _ in range(1500):
        chosen = sel.select(devices, stage, 5, rng, 32, 0.1)
        assert {d.id for d in chosen} <= ok and len({d.id for d in chosen}) == 5
        picked |= {d.id for d in chosen}
    assert picked == ok and 99 in picked
    again = [d.id for d in sel.select(devices, stage, 5, np.random.default_rng(42), 32, 0.1)]
    assert again == [d.id for d in sel.select(devices, stage, 5, np.random.default_rng(42), 32, 0.1)]


# ---- checkpoints ----


def make_state(rng):
    pc = PaceController(PaceConfig(window=2, sample_size=10))
    pc.start_stage("grow-1", {"w": (4, 4)}, seed=2)
    run_walk_small = [pc.observe({"w": rng.normal(size=(4, 4))}) for _ in range(4)]
    assert run_walk_small[-1] is not None
    arrays = {"conv.weight": rng.normal(size=(3, 2, 3, 3)).astype(np.float32),
              "bn.num_batches_tracked": np.array(17, np.int64), "fc.bias": rng.normal(size=5)}
    return ServerState(round=4, plan="profl", plan_state={"stage": 1, "rounds_in_stage": 4},
                       arrays=arrays, pace=pc.state_dict(), rng=rng.bit_generator.state,
                       history=[{"round": 4, "em": None, "acc": 0.5}], config={"k": 20, "lr": 0.01})


def test_checkpoint_round_trip_exact(tmp_path):
    rng = np.random.default_rng(11)
    state = make_state(rng)
    save_state(state, tmp_path)
    save_state(state, tmp_path)  # overwriting works and leaves the previous one only, no temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.old"]
    future = rng.random(5)
    back = load_state(tmp_path)
    assert back.round == 4 and back.plan == "profl" and back.plan_state == state.plan_state
    assert back.history == state.history and back.config == state.config
    for name, a in state.arrays.items():
        assert back.arrays[name].dtype == a.dtype and back.arrays[name].tobytes() == a.tobytes()
    assert list(back.arrays) == list(state.arrays)
    np.testing.assert_array_equal(restore_rng(back.rng).random(5), future)
    pa, pb = PaceController(), PaceController()
    pa.load_state_dict(state.pace)
    pb.load_state_dict(back.pace)
    nxt = {"w": np.arange(16.0).reshape(4, 4)}
    assert pa.observe(nxt) == pb.observe(nxt) and pa.history == pb.history


def test_checkpoint_missing_corrupt_and_crash_recovery(tmp_path, caplog):
    with pytest.raises(StateError, match="no checkpoint"):
        load_state(tmp_path)
    state = make_state(np.random.default_rng(3))
    ck = save_state(state, tmp_path)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # crash between the two renames
    assert load_state(tmp_path).round == 4
    save_state(state, tmp_path)
    state.round = 5
    save_state(state, tmp_path)  # round 5 in checkpoint/, round 4 kept in checkpoint.old/
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.old"]

    def damage(path, how):
        data = bytearray(path.read_bytes())
        if how == "flip":
            data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data if how == "flip" else data[:50]))

    for name, how in (("arrays.npz", "flip"), ("state.json", "truncate")):
        save_state(state, tmp_path)
        save_state(state, tmp_path)  # both intact again
        damage(ck / name, how)  # the latest checkpoint is damaged: the previous round's is used, with a warning
        with caplog.at_level(logging.WARNING, logger="progfl.server"):
            assert load_state(tmp_path).round == 5
        assert "corrupt checkpoint" in caplog.text and "redone" in caplog.text
        caplog.clear()
    save_state(state, tmp_path)
    damage(ck / "arrays.npz", "flip")
    damage(tmp_path / "checkpoint.old" / "state.json", "truncate")
    with pytest.raises(StateError, match="corrupt") as err:  # both damaged: nothing to trust
        load_state(tmp_path)
    assert "\n" not in str(err.value)


def test_server_does_not_import_torch_or_onnx():
    code = "import sys, progfl.server; bad = {'torch', 'onnx', 'onnxruntime'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
