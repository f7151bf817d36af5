"""Unit tests of the pace controller (progfl/server/pace.py): the edges of its rules, beside test_server_core.py's
formula checks.

Effective movement, the least-squares slope and the freezing rule decide when a block stops training; an off-by-one
in a threshold or a window moves every freeze of a run. Each test states the rule (from the module's docstrings and
methods.md) and probes it on both sides of its boundary, with expectations computed by hand or by a plain-Python
formula. (Written for issue 13's mutation testing: `make mutation`.)
"""

from __future__ import annotations

import numpy as np
import pytest

from progfl.manifest import ManifestError
from progfl.server.pace import PaceConfig, PaceController, effective_movement, freeze_rule, slope

# ---- config ----


@pytest.mark.parametrize("kw", [dict(window=0), dict(slope_window=1), dict(sample_size=0), dict(min_rounds=0),
                                dict(min_rounds=6, max_rounds=5), dict(min_rounds=-1, max_rounds=0)])
def test_config_refuses_settings_the_rule_cannot_use(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="pace: "):
        PaceConfig(**kw)


def test_config_accepts_the_smallest_valid_settings() -> None:
    """window 1, a slope over 2 values, 1 sampled scalar, min = max = 1 round: all usable."""
    cfg = PaceConfig(window=1, slope_window=2, sample_size=1, min_rounds=1, max_rounds=1)
    assert (cfg.window, cfg.slope_window, cfg.sample_size, cfg.min_rounds, cfg.max_rounds) == (1, 2, 1, 1, 1)
    PaceConfig(min_rounds=7, max_rounds=7)


# ---- effective movement and slope ----


def test_em_needs_two_vectors_and_two_suffice() -> None:
    with pytest.raises(ValueError, match="two vectors"):
        effective_movement([np.zeros(3)])
    assert effective_movement([np.zeros(3), np.array([1.0, -2.0, 0.0])]) == 1.0  # one step: net = path


def test_em_counts_every_step_of_the_path() -> None:
    """0 -> 1 -> 0 -> 2 (one scalar): net 2, path 1 + 1 + 2 = 4, so 0.5. Dropping the first or the last step from the
    path, or measuring net from the second vector, gives another value."""
    assert effective_movement([np.array([v]) for v in (0.0, 1.0, 0.0, 2.0)]) == pytest.approx(0.5)
    assert effective_movement([np.array([v]) for v in (5.0, 0.0, 1.0)]) == pytest.approx(4 / 6)
    two_d = [np.array([0.0, 0.0]), np.array([1.0, -1.0]), np.array([3.0, -1.0])]
    assert effective_movement(two_d) == pytest.approx(4 / 4)  # L1: |3| + |-1| over (1 + 1) + 2


def test_em_of_no_movement_is_zero() -> None:
    assert effective_movement([np.full(2, 3.0)] * 3) == 0.0


def test_em_is_capped_at_one_where_rounding_exceeds_it() -> None:
    """A monotone path whose float64 sum of steps falls one ulp short of the net move: EM would be 1 + 2e-16;
    the triangle inequality says at most 1, and min() makes it so."""
    a = [-0.008959573978711808, -0.008184939087617563, -0.006029739109814893, -0.001908963203569436,
         0.0016066477197370134]
    net, path = abs(a[-1] - a[0]), sum(abs(a[k] - a[k - 1]) for k in range(1, len(a)))
    assert net / path > 1.0  # the premise: rounding
    assert effective_movement([np.array([v]) for v in a]) == 1.0


def test_em_works_in_float64_whatever_the_input_dtype() -> None:
    """float32 weights: steps of 1e-4 on values near 1 are measured as float64 differences of the float32 values."""
    v = [np.array([1.0], np.float32), np.array([1.0001], np.float32), np.array([1.0], np.float32)]
    assert effective_movement(v) == 0.0  # back where it started: net 0, exactly
    w = [np.array([1.0], np.float32), np.array([1.0001], np.float32), np.array([1.0002], np.float32)]
    ref = abs(float(w[2][0]) - float(w[0][0])) / (abs(float(w[1][0]) - float(w[0][0]))
                                                   + abs(float(w[2][0]) - float(w[1][0])))
    assert effective_movement(w) == pytest.approx(ref, rel=1e-12)


def test_float32_inputs_are_measured_in_float64() -> None:
    """Weights may arrive as float32: EM's sums over many scalars are taken in float64 (float32 sums would be off
    by ~1e-7 relative, enough to move a threshold decision)."""
    rng = np.random.default_rng(7)
    vs = [rng.standard_normal(20_000).astype(np.float32) for _ in range(4)]
    v64 = [v.astype(np.float64) for v in vs]
    path = sum(float(np.abs(v64[k] - v64[k - 1]).sum()) for k in range(1, 4))
    assert effective_movement(vs) == pytest.approx(float(np.abs(v64[3] - v64[0]).sum()) / path, rel=1e-13)


def test_slope_of_a_line_and_of_a_constant() -> None:
    """The slope is the rise per round of the best line: exact on lines, 0 on constants, any offset."""
    for n in (2, 3, 6):
        for a, b in ((0.0, 1.0), (5.0, -0.25), (-3.0, 0.0)):
            assert slope([a + b * t for t in range(n)]) == pytest.approx(b, abs=1e-12)
    assert slope([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.2)  # sum x (y - 0.5) = 1 over sum x^2 = 5


# ---- freezing rule ----

CFG = PaceConfig(slope_window=4, slope_threshold=0.05, em_threshold=0.3, min_rounds=3, max_rounds=10)
FLAT_LOW = [0.2, 0.2, 0.2, 0.2]


def test_freeze_rule_max_rounds_boundary() -> None:
    assert freeze_rule([0.9] * 4, 10, CFG) == (True, "max_rounds: 10 rounds >= 10")
    assert freeze_rule([0.9] * 4, 9, CFG)[0] is False
    assert freeze_rule([0.9] * 4, 11, CFG)[0] is True


def test_freeze_rule_min_rounds_boundary() -> None:
    assert freeze_rule(FLAT_LOW, 2, CFG) == (False, "min_rounds: 2 rounds < 3")
    fired, why = freeze_rule(FLAT_LOW, 3, CFG)
    assert fired and why.startswith("converged")


def test_freeze_rule_needs_slope_window_values() -> None:
    assert freeze_rule(FLAT_LOW[:3], 5, CFG) == (False, "warming up: 3 of 4 EM values")
    assert freeze_rule(FLAT_LOW, 5, CFG)[0] is True


def test_freeze_rule_thresholds_are_strict() -> None:
    """|slope| < threshold and EM < threshold, both strict: EM exactly at the threshold keeps training, and so
    does a slope exactly at it."""
    assert freeze_rule([0.3] * 4, 5, CFG)[0] is False
    assert freeze_rule([0.2999] * 4, 5, CFG)[0] is True
    cfg = PaceConfig(slope_window=2, slope_threshold=0.25, em_threshold=0.3, min_rounds=1, max_rounds=10)
    assert slope([0.0, 0.25]) == 0.25
    assert freeze_rule([0.0, 0.25], 5, cfg)[0] is False  # at the threshold: EM 0.25 is low, but rising
    assert freeze_rule([0.0, 0.24], 5, cfg)[0] is True


def test_freeze_rule_a_falling_curve_is_not_flat() -> None:
    """A steep fall ends low but is not converged: |slope|, not slope, is compared."""
    assert freeze_rule([0.9, 0.6, 0.3, 0.0], 5, CFG)[0] is False
    assert freeze_rule([0.21, 0.2, 0.19, 0.18], 5, CFG)[0] is True  # a gentle fall is flat enough


def test_freeze_rule_needs_both_flat_and_low() -> None:
    assert freeze_rule([0.5] * 4, 5, CFG)[0] is False  # flat, high
    assert freeze_rule([0.0, 0.1, 0.2, 0.29], 5, CFG)[0] is False  # low, rising


def test_freeze_rule_looks_at_the_last_values_only() -> None:
    """The slope is fitted on the last slope_window EM values and the level is the last one: old history neither
    blocks nor triggers a freeze."""
    assert freeze_rule([0.9, 0.9, 0.9] + FLAT_LOW, 8, CFG)[0] is True
    assert freeze_rule(FLAT_LOW + [0.9, 0.9, 0.9, 0.9], 8, CFG)[0] is False
    loose = PaceConfig(slope_window=4, slope_threshold=1.0, em_threshold=0.3, min_rounds=1, max_rounds=10)
    assert freeze_rule([0.5, 0.5, 0.5, 0.2], 5, loose)[0] is True  # the last value is low
    assert freeze_rule([0.2, 0.5, 0.5, 0.5], 5, loose)[0] is False
    assert freeze_rule([0.5, 0.5, 0.2, 0.5], 5, loose)[0] is False


def test_freeze_rule_stage_overrides() -> None:
    """A phase's own min/max rounds replace the config's: a lower cap fires earlier, a higher one later, a higher
    minimum holds a converged block back."""
    assert freeze_rule([0.9] * 4, 4, CFG, max_rounds=4) == (True, "max_rounds: 4 rounds >= 4")
    assert freeze_rule([0.9] * 4, 10, CFG, max_rounds=12)[0] is False
    assert freeze_rule(FLAT_LOW, 5, CFG, min_rounds=6) == (False, "min_rounds: 5 rounds < 6")
    assert freeze_rule(FLAT_LOW, 2, CFG, min_rounds=1)[0] is True
    assert freeze_rule(FLAT_LOW, 6, CFG, min_rounds=20, max_rounds=6)[0] is True  # the cap wins over the minimum


# ---- controller ----


def test_a_fresh_controller_holds_nothing_and_cannot_observe() -> None:
    """Before start_stage: no stage, no sample, no rounds; observe() is an error; its checkpoint is empty and
    loads back into an equally empty controller."""
    pc = PaceController()
    assert pc.config == PaceConfig()
    assert pc.stage == "" and pc.seed == 0 and pc.rounds == 0 and pc.positions == [] and pc.ems == []
    with pytest.raises(ManifestError, match="before start_stage"):
        pc.observe({"w": np.zeros(2)})
    sd = pc.state_dict()
    assert sd["which"].shape == (0,) and sd["index"].shape == (0,) and sd["window"].shape == (0, 0)
    assert (sd["stage"], sd["seed"], sd["names"], sd["rounds"], sd["history"]) == ("", 0, [], 0, [])
    other = PaceController(PaceConfig(window=2))
    other.load_state_dict(sd)
    assert other.config == PaceConfig() and other.positions == [] and other.rounds == 0


def test_positions_cover_small_blocks_in_name_order() -> None:
    """A block of at most sample_size scalars is sampled whole: every (array, flat index) once, arrays in sorted
    name order, whatever order (and form: array or shape, scalar included) they come in."""
    pc = PaceController(PaceConfig(sample_size=10))
    pc.start_stage("s", {"c": [3], "a": np.zeros((2, 2)), "scalar": (), "b": np.array([5.0, 7.0])})
    expect = [("a", i) for i in range(4)] + [("b", 0), ("b", 1)] + [("c", i) for i in range(3)] + [("scalar", 0)]
    assert pc.positions == expect
    assert pc.names == ["a", "b", "c", "scalar"]
    arrays = {"a": np.arange(4.0).reshape(2, 2), "b": np.array([10.0, 11.0]), "c": np.array([20.0, 21.0, 22.0]),
              "scalar": np.array(30.0)}
    got = pc.sample(arrays)
    assert got.tolist() == [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 20.0, 21.0, 22.0, 30.0]
    pc2 = PaceController(PaceConfig(sample_size=11))  # more room than scalars: the same, whole block
    pc2.start_stage("s", {"c": [3], "a": (2, 2), "scalar": (), "b": (2,)})
    assert pc2.positions == expect


def test_a_larger_block_is_sampled_without_repeats_and_the_seed_matters() -> None:
    shapes = {"w": (30, 10), "b": (7,)}
    pcs = [PaceController(PaceConfig(sample_size=50)) for _ in range(3)]
    pcs[0].start_stage("grow-2", shapes, seed=1)
    pcs[1].start_stage("grow-2", shapes, seed=1)
    pcs[2].start_stage("grow-2", shapes, seed=2)
    pos = pcs[0].positions
    assert len(pos) == 50 == len(set(pos)) and pos == sorted(pos, key=lambda p: (p[0] != "b", p[1]))
    assert pos == pcs[1].positions and pos != pcs[2].positions
    assert pcs[0].seed == 1 and pcs[0].stage == "grow-2"
    values = {"w": np.arange(300.0).reshape(30, 10), "b": 1000.0 + np.arange(7.0)}
    assert pcs[0].sample(values).tolist() == [float(values[n].reshape(-1)[i]) for n, i in pos]


def test_a_stage_without_scalars_is_refused() -> None:
    with pytest.raises(ManifestError, match="no trainable scalars"):
        PaceController().start_stage("empty", {"w": (0, 3)})
    with pytest.raises(ManifestError, match="no trainable scalars"):
        PaceController().start_stage("empty", {})


def test_sample_is_float64_and_names_a_missing_array() -> None:
    pc = PaceController()
    pc.start_stage("s", {"w": (3,), "v": (1,)})
    out = pc.sample({"w": np.array([1, 2, 3], np.float32), "v": np.array([0.5], np.float32)})
    assert out.dtype == np.float64 and out.tolist() == [0.5, 1.0, 2.0, 3.0]
    with pytest.raises(ManifestError, match="needs array w"):
        pc.sample({"v": np.zeros(1)})


def test_observe_counts_rounds_and_gives_em_from_round_w() -> None:
    """Without the starting weights, EM first exists at round W+1 and then every round, over the last W+1 vectors."""
    pc = PaceController(PaceConfig(window=2, slope_window=2, min_rounds=1))
    pc.start_stage("s", {"w": (1,)})
    seq = [0.0, 1.0, 3.0, 2.0, 6.0]
    ems = [pc.observe({"w": np.array([v])}) for v in seq]
    assert ems[:2] == [None, None]
    assert ems[2] == pytest.approx(3 / 3) and ems[3] == pytest.approx(1 / 3) and ems[4] == pytest.approx(3 / 5)
    assert pc.rounds == 5 and pc.ems == ems[2:]
    assert pc.history == [{"round": r, "em": e} for r, e in zip(range(1, 6), ems)]


def test_start_stage_forgets_the_previous_stage() -> None:
    """A new stage starts from round 0 with an empty window and history (its EM cannot mix two blocks)."""
    pc = PaceController(PaceConfig(window=1, slope_window=2, min_rounds=1))
    pc.start_stage("one", {"w": (2,)})
    for v in (0.0, 1.0, 2.0):
        pc.observe({"w": np.full(2, v)})
    assert pc.rounds == 3 and len(pc.ems) == 2
    pc.start_stage("two", {"u": (1,)})
    assert pc.rounds == 0 and pc.history == [] and pc.ems == [] and pc.names == ["u"]
    assert pc.observe({"u": np.array([5.0])}) is None  # the window restarted
    assert pc.observe({"u": np.array([4.0])}) == 1.0


def test_should_freeze_passes_the_stage_overrides() -> None:
    pc = PaceController(PaceConfig(window=1, slope_window=2, min_rounds=1, max_rounds=50))
    pc.start_stage("s", {"w": (1,)})
    for v in (0.0, 1.0, 2.0, 3.0):
        pc.observe({"w": np.array([v])})
    assert pc.should_freeze() == (False, pc.should_freeze()[1]) and pc.should_freeze()[1].startswith("training")
    assert pc.should_freeze(max_rounds=4) == (True, "max_rounds: 4 rounds >= 4")
    assert pc.should_freeze(min_rounds=9) == (False, "min_rounds: 4 rounds < 9")


def test_state_dict_round_trip_right_after_start_and_mid_window() -> None:
    """A checkpoint taken with an empty or part-filled window restores the same future EMs and decisions, in a
    controller built with another config."""
    for observed in (0, 2, 5):
        pc = PaceController(PaceConfig(window=3, slope_window=2, min_rounds=1, sample_size=4))
        pc.start_stage("g", {"w": (3, 3)}, seed=4)
        rng = np.random.default_rng(observed)
        for _ in range(observed):
            pc.observe({"w": rng.normal(size=(3, 3))})
        sd = pc.state_dict()
        assert sd["window"].shape == (min(observed, 4), 4)
        back = PaceController(PaceConfig(window=7))
        back.load_state_dict(sd)
        assert back.config == pc.config and back.stage == "g" and back.seed == 4 and back.rounds == observed
        assert back.positions == pc.positions and back.history == pc.history
        future = [rng.normal(size=(3, 3)) for _ in range(5)]
        assert [back.observe({"w": f}) for f in future] == [pc.observe({"w": f}) for f in future]
        assert back.should_freeze() == pc.should_freeze()


def test_state_dict_is_a_snapshot() -> None:
    """Rounds observed after the checkpoint do not leak into it."""
    pc = PaceController(PaceConfig(window=2))
    pc.start_stage("g", {"w": (2,)})
    pc.observe({"w": np.zeros(2)})
    sd = pc.state_dict()
    pc.observe({"w": np.ones(2)})
    pc.history[0]["em"] = 123.0
    assert sd["rounds"] == 1 and len(sd["history"]) == 1 and sd["history"][0]["em"] is None
    assert sd["window"].shape == (1, 2)
