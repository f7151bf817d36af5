"""Unit tests of participant selection (progfl/server/selection.py): sizing a fleet, who is eligible, and
SmartFreeze's score, against numbers worked out by hand from the formula in SmartFreezeSelector's docstring.

test_server_core.py checks the score with alpha = beta = 1, gamma = 0, where h^alpha and h * alpha agree; here
every exponent is non-trivial, the label histograms differ in length, and the floors, the fairness term and the
degenerate pools (no samples, no speed, no labels) are each probed. (Written for issue 13's mutation testing:
`make mutation`.)
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest

import progfl.server.selection as selection
from progfl.manifest import FileRef, MemoryPoint, ParamSpec, Stage, TensorSpec, size_stage
from progfl.server.selection import DeviceInfo, SmartFreezeSelector, StageSizer, UniformSelector, eligible

BATCH, MARGIN = 32, 0.1


def stage() -> Stage:
    """ORT peak = 80 + 2.5 x micro-batch MB (measured at 8 and 32); torch peak = 180 + 2.5 x micro-batch."""
    return Stage(index=0, name="grow-0", kind="grow", block=0, loss="ce", loss_config={}, optimizer={}, inputs=[],
                 feature=TensorSpec("features", [-1, 1]), params=[ParamSpec("w", [1])], session_params={},
                 bn_updates={}, bn_variance={}, files={"torch.training": FileRef("t.pt2", "0" * 64, 1)},
                 footprint={},
                 memory=[MemoryPoint(batch=8, measured_mb=100, estimate_mb=100),
                         MemoryPoint(batch=32, measured_mb=160, estimate_mb=160),
                         MemoryPoint(batch=8, measured_mb=200, estimate_mb=200, backend="torch"),
                         MemoryPoint(batch=32, measured_mb=260, estimate_mb=260, backend="torch")])


def dev(i: int, budget: float, hist: tuple | list = (50, 50), n: int = 100, speed: float = 1.0,
        backend: str = "ort") -> DeviceInfo:
    return DeviceInfo(i, budget, n, np.array(hist), speed, backend)


# ---- sizing a fleet ----


def test_stage_sizer_gives_size_stages_answer_with_fewer_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every device gets exactly size_stage's sizing (its own budget in it), and budgets between two budgets sized
    alike are not sized again."""
    calls: list[float] = []

    def counting(st: Stage, budget: float, *a: object, **kw: object):
        calls.append(budget)
        return size_stage(st, budget, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(selection, "size_stage", counting)
    s = stage()
    budgets = [1000, 2000, 1500, 1200, 1800, 60, 95, 1000, 92, 130, 5000, 91, 200, 150]
    sizer = StageSizer(s, BATCH, MARGIN)
    got = [sizer(dev(i, b)) for i, b in enumerate(budgets)]
    calls_fleet = len(calls)
    for b, z in zip(budgets, got):
        ref = size_stage(s, b, BATCH, MARGIN)
        assert (z.fits, z.micro_batch, z.accum_steps, z.peak_mb, z.budget_mb) == \
               (ref.fits, ref.micro_batch, ref.accum_steps, ref.peak_mb, ref.budget_mb), b
    assert calls_fleet < len(budgets)
    assert 1500 not in calls and 1200 not in calls and 1800 not in calls  # between 1000 and 2000, both micro 32


def test_stage_sizer_never_extrapolates_below_or_above_what_it_sized(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two large budgets sized alike say nothing about a smaller (or larger) budget outside them."""
    s = stage()
    sizer = StageSizer(s, BATCH, MARGIN)
    assert sizer(dev(0, 1000)).fits and sizer(dev(1, 2000)).fits
    small = sizer(dev(2, 50))
    assert not small.fits and small.budget_mb == 50
    sizer2 = StageSizer(s, BATCH, MARGIN)
    assert not sizer2(dev(0, 20)).fits and not sizer2(dev(1, 40)).fits
    big = sizer2(dev(2, 1000))
    assert big.fits and big.micro_batch == 32 and big.budget_mb == 1000


def test_stage_sizer_keeps_backends_apart() -> None:
    """The same budget holds the stage under ORT (peak 160 at 32) but only at a smaller micro-batch under torch
    (peak 180 + 2.5 x micro): each backend's own answer."""
    s = stage()
    sizer = StageSizer(s, BATCH, MARGIN)
    ort = sizer(dev(0, 200))
    torch = sizer(dev(1, 200, backend="torch"))
    assert (ort.micro_batch, ort.peak_mb) == (32, 160.0)
    assert not torch.fits  # 180 + 2.5 > 180: torch cannot hold it in 200 MB x 0.9
    assert dev(1, 200, backend="torch").sizing(s, BATCH, MARGIN).fits is False
    z = sizer(dev(2, 300, backend="torch"))
    assert (z.micro_batch, z.peak_mb) == (32, 260.0)  # 260 <= 270
    assert (sizer(dev(3, 250)).micro_batch, sizer(dev(3, 250)).peak_mb) == (32, 160.0)  # ORT's, not torch's


def test_eligible_keeps_fleet_order_and_only_what_fits() -> None:
    """Micro-batch 1 needs 82.5 MB <= 0.9 x budget: 91.67 MB and up."""
    devices = [dev(0, 500), dev(1, 91.6), dev(2, 91.7), dev(3, 20), dev(4, 100)]
    assert [d.id for d in eligible(devices, stage(), BATCH, MARGIN)] == [0, 2, 4]


# ---- uniform ----


def test_uniform_takes_everyone_eligible_when_k_is_large_and_nobody_for_k_zero() -> None:
    devices = [dev(0, 500), dev(1, 20), dev(2, 100), dev(3, 300)]
    rng = np.random.default_rng(0)
    assert [d.id for d in UniformSelector().select(devices, stage(), 3, rng, BATCH, MARGIN)] == [0, 2, 3]
    assert [d.id for d in UniformSelector().select(devices, stage(), 9, rng, BATCH, MARGIN)] == [0, 2, 3]
    assert UniformSelector().select(devices, stage(), 0, rng, BATCH, MARGIN) == []
    assert UniformSelector().select(devices, stage(), -2, rng, BATCH, MARGIN) == []
    assert len(UniformSelector().select(devices, stage(), 1, rng, BATCH, MARGIN)) == 1


def test_uniform_without_the_memory_check_picks_from_everyone() -> None:
    """FedAvg's upper bound ignores budgets: the 20 MB device is drawn too."""
    devices = [dev(0, 500), dev(1, 20), dev(2, 100)]
    rng = np.random.default_rng(1)
    assert [d.id for d in UniformSelector(memory=False).select(devices, stage(), 5, rng, BATCH, MARGIN)] == [0, 1, 2]
    seen = Counter(d.id for _ in range(200) for d in UniformSelector(memory=False).select(
        devices, stage(), 1, rng, BATCH, MARGIN))
    assert set(seen) == {0, 1, 2} and min(seen.values()) > 30
    seen_mem = Counter(d.id for _ in range(100) for d in UniformSelector().select(
        devices, stage(), 1, rng, BATCH, MARGIN))
    assert set(seen_mem) == {0, 2}


# ---- SmartFreeze ----


def hand_pool() -> list[DeviceInfo]:
    """Headroom: budget 1000 -> micro 32, peak 160, h = 0.84; 200 -> micro 32, h = 0.2; 98 (limit 88.2) -> micro 2,
    peak 85, h = 1 - 85/98. Samples 100, 300, 200: share 0.5, 1.5, 1. Labels [50,50], [300,0,0], [0,100]: pooled [0.7, 0.3, 0],
    balance 1 - TV = 0.8, 0.7, 0.3. Speeds 1, 4, 1: pace 0.5, 2, 0.5."""
    return [dev(0, 1000, (50, 50), 100, 1.0), dev(1, 200, (300, 0, 0), 300, 4.0), dev(2, 98, (0, 100), 200, 1.0)]


def test_smartfreeze_scores_by_hand_with_every_exponent() -> None:
    sel = SmartFreezeSelector(alpha=2.0, beta=0.5, gamma=3.0, explore=0.3)
    h, sb, v = [0.84, 0.2, 1 - 85 / 98], [0.5 * 0.8, 1.5 * 0.7, 1.0 * 0.3], [0.5, 2.0, 0.5]
    expect = [h[i] ** 2.0 * sb[i] ** 0.5 * v[i] ** 3.0 for i in range(3)]
    pool = hand_pool()
    np.testing.assert_allclose(sel.scores(pool, stage(), BATCH, MARGIN), expect, rtol=1e-12)
    q = [0.7 * s / sum(expect) + 0.3 / 3 for s in expect]
    p = sel.probabilities(pool, stage(), BATCH, MARGIN)
    np.testing.assert_allclose(p, q, rtol=1e-12)
    assert p.sum() == pytest.approx(1.0)


def test_smartfreeze_floors_each_factor() -> None:
    """A factor of 0 (no headroom at margin 0, no labels, no speed) counts as 1e-3, so the device keeps a score;
    a device without labels is not a 0/0 (no numpy warning on the server's console)."""
    sel = SmartFreezeSelector(alpha=1.0, beta=1.0, gamma=1.0)
    pool = [dev(0, 82.5, (10, 10), 100, 2.0),  # micro 1, peak 82.5 = budget: h = 0
            dev(1, 1000, (0, 0), 100, 2.0),  # no labels: balance 0
            dev(2, 1000, (10, 10), 100, 0.0)]  # speed 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sel.scores(pool, stage(), BATCH, 0.0)
    pace = [2.0 / (4 / 3), 2.0 / (4 / 3), 1e-3]
    expect = [1e-3 * 1.0 * pace[0], 0.84 * 1e-3 * pace[1], 0.84 * 1.0 * pace[2]]
    np.testing.assert_allclose(got, expect, rtol=1e-9)


def test_smartfreeze_degenerate_pools_score_as_equals() -> None:
    """No device has samples, or none has a measured speed: that factor is 1 for everyone (not 0/0)."""
    sel = SmartFreezeSelector(alpha=1.0, beta=1.0, gamma=1.0)
    pool = [dev(0, 1000, (10, 10), 0, 0.0), dev(1, 1000, (10, 10), 0, 0.0)]
    np.testing.assert_allclose(sel.scores(pool, stage(), BATCH, MARGIN), [0.84, 0.84], rtol=1e-12)
    np.testing.assert_allclose(sel.probabilities(pool, stage(), BATCH, MARGIN), [0.5, 0.5])


def test_smartfreeze_share_and_pace_are_relative_to_the_pool_mean() -> None:
    """Share n / mean(n) and pace speed / mean(speed) whatever the scale: samples 2 and 0 (mean 1) give shares 2 and
    0 (floored); speeds 0.2 and 0.6 (mean 0.4) give paces 0.5 and 1.5."""
    sel = SmartFreezeSelector(alpha=0.0, beta=1.0, gamma=1.0)
    pool = [dev(0, 1000, (5, 5), 2, 0.2), dev(1, 1000, (5, 5), 0, 0.6)]
    np.testing.assert_allclose(sel.scores(pool, stage(), BATCH, MARGIN), [2.0 * 0.5, 1e-3 * 1.5], rtol=1e-12)


@pytest.mark.parametrize("explore", [0.0, -0.1, 1.01])
def test_smartfreeze_explore_must_be_in_0_1(explore: float) -> None:
    with pytest.raises(ValueError, match="explore"):
        SmartFreezeSelector(explore=explore)


def test_smartfreeze_explore_one_is_uniform() -> None:
    sel = SmartFreezeSelector(explore=1.0)
    np.testing.assert_allclose(sel.probabilities(hand_pool(), stage(), BATCH, MARGIN), [1 / 3] * 3, rtol=1e-12)
    assert (sel.alpha, sel.beta, sel.gamma, sel.explore) == (1.0, 1.0, 0.5, 1.0)


def test_smartfreeze_draws_by_its_probabilities() -> None:
    """A strong device and a floored one with explore 0.02: the weak one is drawn about 1 % of the time, not half."""
    sel = SmartFreezeSelector(alpha=1.0, beta=1.0, gamma=1.0, explore=0.02)
    devices = [dev(0, 1000, (10, 10), 100, 1.0), dev(1, 1000, (0, 0), 100, 1.0), dev(2, 10)]
    q = sel.probabilities(eligible(devices, stage(), BATCH, MARGIN), stage(), BATCH, MARGIN)
    assert q[1] == pytest.approx(0.98 * 1e-3 / (1 + 1e-3) + 0.01)
    rng = np.random.default_rng(3)
    counts = Counter(sel.select(devices, stage(), 1, rng, BATCH, MARGIN)[0].id for _ in range(400))
    assert counts[2] == 0 and counts[1] < 20 and counts[0] > 380


def test_smartfreeze_without_repeats_everyone_for_large_k_nobody_for_zero() -> None:
    sel = SmartFreezeSelector()
    devices = [dev(i, 100 + 50 * i, (i + 1, 5), 10 * (i + 1), 1.0 + i) for i in range(6)] + [dev(9, 30)]
    rng = np.random.default_rng(4)
    for _ in range(50):
        chosen = [d.id for d in sel.select(devices, stage(), 5, rng, BATCH, MARGIN)]
        assert len(set(chosen)) == 5 and 9 not in chosen
    assert [d.id for d in sel.select(devices, stage(), 6, rng, BATCH, MARGIN)] == [0, 1, 2, 3, 4, 5]
    assert sel.select(devices, stage(), 0, rng, BATCH, MARGIN) == []
    assert sel.select(devices, stage(), -1, rng, BATCH, MARGIN) == []


def test_balance_is_one_minus_total_variation() -> None:
    """Two devices with mirrored labels [a, b] and [b, a]: the pooled mix is uniform and each one's balance is
    1 - TV = 1 - |a - b| / (2 (a + b)), whatever the sample counts' effect on share (equal here)."""
    sel = SmartFreezeSelector(alpha=0.0, beta=1.0, gamma=0.0)
    for a, b in ((30, 10), (1, 0), (5, 5)):
        pool = [dev(0, 1000, (a, b)), dev(1, 1000, (b, a))]
        expect = 1 - abs(a - b) / (2 * (a + b))
        np.testing.assert_allclose(sel.scores(pool, stage(), BATCH, MARGIN), [expect, expect], rtol=1e-12)
    # one sample against three: pooled [0.25, 0.75]; TV 0.75 and 0.25
    pool = [dev(0, 1000, (1, 0)), dev(1, 1000, (0, 3))]
    np.testing.assert_allclose(sel.scores(pool, stage(), BATCH, MARGIN), [0.25, 0.75], rtol=1e-12)
