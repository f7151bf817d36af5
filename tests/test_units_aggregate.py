"""Unit tests of server aggregation (progfl/server/aggregate.py): the edges of its rules, beside test_server_core.py
and tests/test_properties.py.

FedAvg keeps a round alive by dropping what it cannot average; the distance and direction rules drop what a
diverged or malicious device sends. Each test probes one rule on both sides of its boundary (a distance exactly k x
the median, a cosine exactly 0, a sample count exactly the cap, one update fewer than the median rule needs) with
values small enough to check by hand. (Written for issue 13's mutation testing: `make mutation`.)
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from progfl.manifest import ManifestError, ParamSpec, TrainUpdate
from progfl.server.aggregate import Aggregator, SliceAverage, distant_updates, opposed_updates

SPECS = [ParamSpec("w", [2]), ParamSpec("b", [1])]


def up(w: list[float], b: float, n: int = 1, metrics: dict | None = None, rnd: int = 1,
       stage: str = "grow-0") -> TrainUpdate:
    return TrainUpdate(rnd, stage, {"w": np.asarray(w, np.float32), "b": np.asarray([b], np.float32)}, n,
                       metrics if metrics is not None else {})


# ---- Aggregator.check / add ----


@pytest.mark.parametrize("n", [True, 2.0, "3", None, 0, -4])
def test_sample_count_must_be_a_positive_integer(n: object) -> None:
    agg = Aggregator(SPECS)
    assert agg.add(up([1, 1], 1, n=n)) == f"num_samples must be a positive integer, got {n!r}"  # type: ignore[arg-type]
    assert agg.accepted == 0 and agg.result() is None


@pytest.mark.parametrize("n", [1, np.int32(3), np.int64(7)])
def test_integer_sample_counts_are_accepted(n: int) -> None:
    agg = Aggregator(SPECS)
    assert agg.add(up([1, 1], 1, n=n)) is None
    assert agg.total_samples == int(n) and isinstance(agg.total_samples, int)


def test_round_and_stage_are_checked_only_when_set() -> None:
    strict = Aggregator(SPECS, round=4, stage="grow-1")
    assert strict.add(up([0, 0], 0, rnd=3, stage="grow-1")) == "stale: round 3, expected 4"
    assert strict.add(up([0, 0], 0, rnd=4, stage="grow-0")) == "wrong stage 'grow-0', expected 'grow-1'"
    assert strict.add(up([0, 0], 0, rnd=4, stage="grow-1")) is None
    loose = Aggregator(SPECS)
    assert loose.add(up([0, 0], 0, rnd=99, stage="anything")) is None


def test_array_checks_name_the_problem() -> None:
    """One reason per update, naming the first problem: unknown arrays (the first, and how many more), a missing
    one, a wrong shape, a non-numeric dtype, a weights field that is not a dict."""
    agg = Aggregator(SPECS)
    base = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    cases = [
        ({**base, "zz": np.zeros(1), "aa": np.zeros(1), "mm": np.zeros(1)}, "unknown array aa (+2 more)"),
        ({**base, "zz": np.zeros(1), "aa": np.zeros(1)}, "unknown array aa (+1 more)"),
        ({**base, "zz": np.zeros(1)}, "unknown array zz"),
        ({"w": base["w"]}, "missing array b"),
        ({**base, "w": np.zeros(3, np.float32)}, "w has shape [3], expected [2]"),
        ({**base, "b": np.array([True])}, "b has non-numeric dtype bool"),
        ({**base, "b": np.array([1 + 2j])}, "b has non-numeric dtype complex128"),
        ({**base, "b": np.array(["x"])}, "b has non-numeric dtype <U1"),
    ]
    for weights, reason in cases:
        assert agg.add(TrainUpdate(1, "grow-0", weights, 5, {})) == reason
    assert agg.add(TrainUpdate(1, "grow-0", [base["w"], base["b"]], 5, {})) == "weights is not a dict of arrays"  # type: ignore[arg-type]
    ints = {"w": np.array([1, 2], np.int64), "b": np.array([3], np.uint8)}  # integer arrays are numbers too
    assert agg.add(TrainUpdate(1, "grow-0", ints, 5, {})) is None


def test_non_finite_values_in_any_array_are_refused_quietly() -> None:
    """NaN, Inf, and float64 values that overflow float32 are refused with a reason; the overflow is not a numpy
    RuntimeWarning on the server's console."""
    agg = Aggregator(SPECS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for w, b in (([np.nan, 0], 0.0), ([0, 0], np.inf), ([0, 0], -np.inf)):
            assert agg.add(up(w, b)).endswith("contains NaN or Inf (in the global dtype, float32)")
        huge = TrainUpdate(1, "grow-0", {"w": np.array([1e39, 0.0]), "b": np.zeros(1)}, 1, {})
        assert agg.add(huge) == "w contains NaN or Inf (in the global dtype, float32)"
        fine = TrainUpdate(1, "grow-0", {"w": np.array([3e38, 0.0]), "b": np.zeros(1)}, 1, {})
        assert agg.add(fine) is None


def test_anonymous_updates_are_numbered_in_arrival_order() -> None:
    """Without a device id an update is known by its arrival index (0, 1, ...), dropped or not, and rejects made
    outside add() take a number too."""
    agg = Aggregator(SPECS)
    agg.add(up([1, 1], 1, n=2))
    agg.add(up([np.nan, 1], 1))
    agg.reject(up([5, 5], 5), "far", "too far")
    agg.add(up([3, 3], 3, n=1))
    assert agg.weights == {0: 2, 3: 1}
    assert [who for who, _ in agg.dropped] == [1, "far"]
    agg.add(up([0, 0], 0, n=0))
    assert agg.dropped[-1][0] == 4


def test_device_ids_are_kept() -> None:
    agg = Aggregator(SPECS)
    agg.add(up([1, 1], 1, n=2), device=17)
    agg.add(up([1, 1], 1, n=0), device="d9")
    assert agg.weights == {17: 2} and agg.dropped == [("d9", "num_samples must be a positive integer, got 0")]


def test_the_cap_applies_only_to_larger_claims() -> None:
    """A claim above what the server knows is weighted by what it knows; a claim at or below it by itself."""
    agg = Aggregator(SPECS)
    agg.add(up([0, 0], 0, n=3), device="under", max_samples=10)
    agg.add(up([4, 4], 4, n=10), device="equal", max_samples=10)
    agg.add(up([8, 8], 8, n=1000), device="over", max_samples=5)
    agg.add(up([2, 2], 2, n=2), device="nocap")
    assert agg.weights == {"under": 3, "equal": 10, "over": 5, "nocap": 2}
    assert agg.total_samples == 20
    np.testing.assert_allclose(agg.result()["w"], [(0 * 3 + 4 * 10 + 8 * 5 + 2 * 2) / 20] * 2)


def test_the_weighted_mean_of_three_updates() -> None:
    agg = Aggregator(SPECS)
    for w, b, n in (([1, -1], 2, 1), ([2, 0], 4, 2), ([4, 8], -8, 5)):
        assert agg.add(up(w, b, n=n)) is None
    res = agg.result()
    np.testing.assert_allclose(res["w"], [(1 + 4 + 20) / 8, (-1 + 0 + 40) / 8], rtol=1e-7)
    np.testing.assert_allclose(res["b"], [(2 + 8 - 40) / 8], rtol=1e-7)
    assert res["w"].dtype == np.float32 and agg.accepted == 3


def test_metrics_are_sample_weighted_over_the_updates_that_report_them() -> None:
    """Numbers (numpy ones included) are averaged by sample weight over the updates that reported them; booleans,
    strings, NaN and Inf are ignored; no metrics at all is fine."""
    agg = Aggregator(SPECS)
    agg.add(up([0, 0], 0, n=1, metrics={"loss": 1.0, "acc": np.float32(0.5), "flag": True, "tag": "x"}))
    agg.add(up([0, 0], 0, n=3, metrics={"loss": 3, "peak": float("nan"), "t": float("inf")}))
    agg.add(TrainUpdate(1, "grow-0", {"w": np.zeros(2), "b": np.zeros(1)}, 4, None))  # type: ignore[arg-type]
    agg.add(up([0, 0], 0, n=2, metrics={"peak": 10.0}))
    m = agg.metrics()
    assert set(m) == {"loss", "acc", "peak"}
    assert m["loss"] == pytest.approx((1 * 1.0 + 3 * 3) / 4)
    assert m["acc"] == pytest.approx(0.5) and m["peak"] == pytest.approx(10.0)
    assert Aggregator(SPECS).metrics() == {}


def test_result_needs_min_updates() -> None:
    for min_updates, accepted, has in ((0, 0, False), (0, 1, True), (1, 1, True), (3, 2, False), (3, 3, True)):
        agg = Aggregator(SPECS, min_updates=min_updates)
        for _ in range(accepted):
            agg.add(up([1, 1], 1))
        assert (agg.result() is not None) == has, (min_updates, accepted)


def test_summary_is_what_the_round_log_records() -> None:
    agg = Aggregator(SPECS)
    agg.add(up([1, 1], 1, n=4), device=1)
    agg.add(up([1, 1], 1, n=-1), device=2)
    agg.reject(up([1, 1], 1), 3, "moved far")
    assert agg.summary() == {"accepted": 1, "samples": 4,
                             "dropped": [[2, "num_samples must be a positive integer, got -1"], [3, "moved far"]]}


def test_drops_and_caps_are_logged_with_device_round_and_stage(caplog: pytest.LogCaptureFixture) -> None:
    """Each drop is one warning naming the device, the update's round and stage, and the reason; a claim above the
    cap is one warning with the claim and the cap; an honest claim (at or below the cap) logs nothing."""
    agg = Aggregator(SPECS)
    with caplog.at_level(logging.WARNING, logger="progfl.server"):
        agg.add(up([1, 1], 1, n=0, rnd=3, stage="grow-2"), device=5)
        agg.reject(up([1, 1], 1, rnd=4, stage="grow-3"), 6, "points away")
        agg.add(up([1, 1], 1, n=50, rnd=2), device=7, max_samples=8)
        agg.add(up([1, 1], 1, n=8, rnd=2), device=9, max_samples=8)
        agg.add(up([1, 1], 1, n=3, rnd=2), device=10, max_samples=8)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3
    assert all(word in msgs[0] for word in ("device 5", "round 3", "grow-2", "num_samples must be"))
    assert all(word in msgs[1] for word in ("device 6", "round 4", "grow-3", "points away"))
    assert "device 7" in msgs[2] and "50" in msgs[2] and "8" in msgs[2]


# ---- merge ----


def test_merge_rounds_integer_arrays_and_keeps_the_rest() -> None:
    """A BatchNorm counter (int64) averaged to 2.6 becomes 3, not 2; float arrays keep their value in their own
    dtype; arrays not averaged are the very same objects."""
    glob = {"count": np.array(1, np.int64), "w": np.zeros(2, np.float32), "frozen": np.ones(3, np.float64),
            "u": np.zeros(2, np.uint8)}
    res = {"count": np.array(2.6, np.float32), "w": np.array([0.25, -1.5], np.float32),
           "u": np.array([3.4, 250.5], np.float32)}
    merged = Aggregator.merge(glob, res)
    assert merged["count"].dtype == np.int64 and int(merged["count"]) == 3
    assert merged["w"].tolist() == [0.25, -1.5] and merged["w"].dtype == np.float32
    assert merged["u"].tolist() == [3, 250] and merged["u"].dtype == np.uint8  # rint: half to even
    assert merged["frozen"] is glob["frozen"] and int(glob["count"]) == 1
    with pytest.raises(ManifestError, match="not an array of the global model"):
        Aggregator.merge(glob, {"x": np.zeros(1)})
    with pytest.raises(ManifestError, match=r"w has shape \[3\], global \[2\]"):
        Aggregator.merge(glob, {"w": np.zeros(3, np.float32)})


# ---- SliceAverage ----


def test_slice_average_by_hand() -> None:
    """Two sub-models of a 2x3 array: the first holds rows 0-1 x columns 0-1 (weight 1), the second row 1 x
    columns 1-2 (weight 3). Shared element (1,1): (1*a + 3*b)/4; (0,2) held by nobody keeps the global value."""
    glob = {"a": np.full((2, 3), 9.0, np.float32), "untouched": np.zeros(1, np.float32)}
    sa = SliceAverage()
    sa.add("a", (2, 3), (np.array([0, 1]), np.array([0, 1])), np.array([[1.0, 2.0], [3.0, 4.0]]), 1.0)
    sa.add("a", (2, 3), (np.array([1]), np.array([2, 1])), np.array([[10.0, 20.0]]), 3.0)
    out = sa.result(glob)
    assert set(out) == {"a"} and out["a"].dtype == np.float32
    np.testing.assert_allclose(out["a"], [[1.0, 2.0, 9.0], [3.0, (4.0 + 60.0) / 4, 10.0]])
    assert glob["a"][0, 2] == 9.0  # the global array is not written


def test_slice_average_checks_values_in_float32() -> None:
    sa = SliceAverage()
    sa.add("a", (1,), (np.array([0]),), np.array([1e39]), 1.0)
    assert np.isinf(sa.result({"a": np.zeros(1, np.float32)})["a"][0])


# ---- distance rule ----


def one(v: float) -> TrainUpdate:
    return TrainUpdate(1, "g", {"w": np.array([v], np.float32)}, 1, {})


G1 = {"w": np.zeros(1, np.float32)}


def test_distance_rule_is_strictly_more_than_k_times_the_median() -> None:
    """Distances 1, 1, 1, 2 with k = 2: the median is 1, and 2 is not more than 2 x 1; 2.5 is."""
    ups = [(0, one(1.0)), (1, one(-1.0)), (2, one(1.0))]
    assert distant_updates(G1, [*ups, (3, one(2.0))], ["w"], k=2) == {}
    got = distant_updates(G1, [*ups, (3, one(2.5))], ["w"], k=2)
    assert got == {3: "moved 2.5 from the global weights, more than 2 x the round's median 1"}
    assert distant_updates(G1, [*ups, (3, one(2.5))], ["w"], k=0.5).keys() == {0, 1, 2, 3}


def test_distance_rule_scales_the_median_by_k() -> None:
    """Median 2, k = 2: the limit is 4 (k x median), not 1 (k / median)."""
    ups = [(0, one(2.0)), (1, one(-2.0)), (2, one(2.0))]
    assert distant_updates(G1, [*ups, (3, one(4.0))], ["w"], k=2) == {}
    assert list(distant_updates(G1, [*ups, (3, one(4.5))], ["w"], k=2)) == [3]


def test_distance_rule_goes_on_past_a_malformed_update() -> None:
    """A malformed update (an array missing) is skipped, and the updates after it are still measured."""
    missing = TrainUpdate(1, "g", {"v": np.ones(1, np.float32)}, 1, {})
    ups = [(0, one(1.0)), (1, missing), (2, one(50.0)), (3, one(1.0)), (4, one(1.5))]
    assert list(distant_updates(G1, ups, ["w"], k=3)) == [2]


def test_distance_rule_needs_three_finite_distances() -> None:
    """Three updates are enough for a median; two, or three of which one is malformed or non-finite, are not."""
    assert list(distant_updates(G1, [(0, one(1)), (1, one(1)), (2, one(50))], ["w"], k=3)) == [2]
    assert distant_updates(G1, [(0, one(1)), (2, one(50))], ["w"], k=3) == {}
    missing = TrainUpdate(1, "g", {"v": np.ones(1, np.float32)}, 1, {})
    shape = TrainUpdate(1, "g", {"w": np.ones(2, np.float32)}, 1, {})
    text = TrainUpdate(1, "g", {"w": np.array(["a"])}, 1, {})
    for bad in (missing, one(np.inf), one(np.nan), text):
        assert distant_updates(G1, [(0, one(1)), (1, bad), (2, one(50))], ["w"], k=3) == {}
    assert distant_updates(G1, [(0, one(1)), (1, shape), (2, one(50)), (3, one(1))], ["w"], k=3).keys() == {2}
    with_inf = [(0, one(1)), (1, one(1)), (2, one(50)), (3, one(np.inf))]
    assert list(distant_updates(G1, with_inf, ["w"], k=3)) == [2]  # Inf is check()'s to drop, not reported here


def test_distance_rule_is_off_for_k_zero_or_a_zero_median() -> None:
    ups = [(0, one(0.0)), (1, one(0.0)), (2, one(7.0))]
    assert distant_updates(G1, ups, ["w"], k=2) == {}  # median 0: nothing to compare with
    far = [(0, one(1.0)), (1, one(1.0)), (2, one(9.0))]
    assert distant_updates(G1, far, ["w"], k=0) == {} and distant_updates(G1, far, ["w"], k=-1) == {}
    assert list(distant_updates(G1, far, ["w"], k=1e-9)) == [0, 1, 2]


def test_distance_is_l2_over_the_named_arrays_from_the_global_weights() -> None:
    """Distance from the global weights, not from zero, summed over every named array (sqrt(3^2 + 4^2) = 5)."""
    glob = {"w": np.array([10.0], np.float32), "b": np.array([-10.0], np.float32)}

    def two(w: float, b: float) -> TrainUpdate:
        return TrainUpdate(1, "g", {"w": np.array([w], np.float32), "b": np.array([b], np.float32)}, 1, {})

    ups = [(0, two(11.0, -10.0)), (1, two(10.0, -11.0)), (2, two(9.0, -10.0)), (3, two(13.0, -6.0))]
    got = distant_updates(glob, ups, ["w", "b"], k=4.9)
    assert list(got) == [3] and got[3].startswith("moved 5 from")
    assert distant_updates(glob, ups, ["w", "b"], k=5.0) == {}
    assert list(distant_updates(glob, ups, ["w"], k=2.9)) == [3]  # over w only: 3 > 2.9 x 1


# ---- direction rule ----


def test_direction_rule_drops_cosine_zero_and_below() -> None:
    """Orthogonal (cosine 0) and opposed updates point away; a zero update has no direction and counts as cosine 0;
    a slightly aligned one stays. The global model has norm exactly 1 here."""
    glob = {"w": np.array([1.0, 0.0], np.float32)}

    def u(a: float, b: float) -> TrainUpdate:
        return TrainUpdate(1, "g", {"w": np.array([a, b], np.float32)}, 1, {})

    got = opposed_updates(glob, [(0, u(0.0, 5.0)), (1, u(-1.0, 1.0)), (2, u(0.0, 0.0)), (3, u(0.01, 9.0)),
                                 (4, u(3.0, -2.0))], ["w"])
    assert got == {0: "points away from the global weights (cosine 0.00 <= 0)",
                   1: "points away from the global weights (cosine -0.71 <= 0)",
                   2: "points away from the global weights (cosine 0.00 <= 0)"}


def test_direction_rule_reports_the_cosine_and_keeps_small_aligned_updates() -> None:
    """The reason carries the cosine itself (global norm 2 here, so the norms must both divide); an update of norm
    below 1 that points the global way stays."""
    glob = {"w": np.array([2.0, 0.0], np.float32)}

    def u(a: float, b: float) -> TrainUpdate:
        return TrainUpdate(1, "g", {"w": np.array([a, b], np.float32)}, 1, {})

    got = opposed_updates(glob, [(0, u(-3.0, 4.0)), (1, u(0.3, 0.1)), (2, u(0.001, -0.0005))], ["w"])
    assert got == {0: "points away from the global weights (cosine -0.60 <= 0)"}


def test_direction_rule_skips_what_check_drops_and_needs_a_direction() -> None:
    glob = {"w": np.array([2.0, 1.0], np.float32)}
    bad = [(0, TrainUpdate(1, "g", {"v": np.ones(2, np.float32)}, 1, {})),
           (1, TrainUpdate(1, "g", {"w": np.array([-np.inf, 0.0], np.float32)}, 1, {})),
           (2, TrainUpdate(1, "g", {"w": np.array([-1e39, 0.0])}, 1, {})),
           (3, TrainUpdate(1, "g", {"w": np.array([-1.0, -1.0], np.float32)}, 1, {}))]
    assert list(opposed_updates(glob, bad, ["w"])) == [3]
    assert opposed_updates(glob, bad, []) == {}  # no arrays named: no direction
    assert opposed_updates({"w": np.zeros(2, np.float32)}, bad, ["w"]) == {}


def test_direction_is_over_all_named_arrays() -> None:
    """Opposed in one array, aligned more strongly in another: the concatenated vector still points the global
    way; over the opposed array alone it does not."""
    glob = {"a": np.array([1.0], np.float32), "b": np.array([1.0], np.float32)}
    u = TrainUpdate(1, "g", {"a": np.array([-1.0], np.float32), "b": np.array([3.0], np.float32)}, 1, {})
    assert opposed_updates(glob, [(0, u)], ["a", "b"]) == {}
    assert list(opposed_updates(glob, [(0, u)], ["a"])) == [0]
