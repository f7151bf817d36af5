"""Property-based tests (hypothesis) where inputs vary: partitions, aggregation, stage sizing (issue 13, part 5).

Each property is checked against a reference computed here, independently of the code under test (float64 numpy,
plain Python loops), never against hard-coded results.

Reproducibility: every test runs with ``derandomize=True`` and ``database=None``, so CI draws the same examples on
every run and machine, and a failure found once is found again (hypothesis still shrinks it and prints the
example). The price is that runs do not explore new inputs; set ``PROGFL_HYPOTHESIS_EXPLORE=1`` to draw fresh random
examples (and 5x as many) when hunting for bugs locally.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from progfl.data import (
    DataError,
    Dataset,
    DeviceShards,
    by_group,
    dirichlet,
    held_out,
    iid,
    label_dirichlet,
    shards,
    write_partition,
)
from progfl.manifest import (
    FileRef,
    ManifestError,
    MemoryPoint,
    ParamSpec,
    Sizing,
    Stage,
    TensorSpec,
    TrainUpdate,
    predicted_peak_mb,
    size_stage,
)
from progfl.server.aggregate import Aggregator, SliceAverage
from progfl.server.selection import DeviceInfo, StageSizer, eligible

_EXPLORE = os.environ.get("PROGFL_HYPOTHESIS_EXPLORE") == "1"


def props(max_examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The settings every property here uses: reproducible (see the module docstring), no per-example deadline
    (a shared 2-core CI machine stalls at random), and a small example count to keep the file within ~30 s."""
    return settings(max_examples=max_examples * (5 if _EXPLORE else 1), deadline=None, derandomize=not _EXPLORE,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


SEEDS = st.integers(0, 2**32 - 1)
LABELS = hnp.arrays(np.int64, st.integers(1, 300), elements=st.integers(0, 9))  # classes may be missing
ALPHAS = st.floats(0.01, 100.0)


# ---------------------------------------------------------------- partitions


def assert_partition(parts: list[np.ndarray], y: np.ndarray, n_devices: int, covers: bool = True) -> np.ndarray:
    """The module's promise: one sorted int64 index array per device, pairwise disjoint, and (all but `shards`) every
    sample covered. Returns the concatenated indices."""
    assert len(parts) == n_devices
    for p in parts:
        assert isinstance(p, np.ndarray) and p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "not sorted, or a duplicate within a device"
    every = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    assert every.size == 0 or (every.min() >= 0 and every.max() < len(y))
    times = np.bincount(every, minlength=len(y))
    assert times.max(initial=0) <= 1, "a sample on two devices"
    if covers:
        assert np.all(times == 1), "a sample lost"
        assert np.array_equal(np.bincount(y[every], minlength=10), np.bincount(y, minlength=10))
    return every


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, z) for x, z in zip(a, b))


@props(100)
@given(y=LABELS, n_devices=st.integers(1, 40), seed=SEEDS)
def test_iid_covers_once_equal_sizes_and_seeded(y: np.ndarray, n_devices: int, seed: int) -> None:
    """iid: every sample exactly once, sizes within 1 of each other (empty only beyond one per sample), same seed ->
    same split."""
    parts = iid(y, n_devices, np.random.default_rng(seed))
    assert_partition(parts, y, n_devices)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert same(parts, iid(y, n_devices, np.random.default_rng(seed)))


@props(100)
@given(y=LABELS, n_devices=st.integers(1, 30), alpha=ALPHAS, min_size=st.integers(0, 12), seed=SEEDS)
def test_dirichlet_covers_once_keeps_floor_or_refuses(y: np.ndarray, n_devices: int, alpha: float, min_size: int,
                                                      seed: int) -> None:
    """dirichlet: every sample exactly once; when the data can give every device `min_size` samples, every device
    gets them or DataError says so (after max_tries); when it cannot, the first draw is kept (never an error);
    same seed -> same split."""
    floor = min_size * n_devices <= len(y)
    try:
        parts = dirichlet(y, n_devices, alpha, np.random.default_rng(seed), min_size=min_size, max_tries=20)
    except DataError:
        assert floor and min_size > 0, "refused although no floor applies"
        event("dirichlet: refused")
        return
    event(f"dirichlet: floor {'kept' if floor and min_size else 'none'}")
    assert_partition(parts, y, n_devices)
    if floor:
        assert min(len(p) for p in parts) >= min_size
    again = dirichlet(y, n_devices, alpha, np.random.default_rng(seed), min_size=min_size, max_tries=20)
    assert same(parts, again)


@props(100)
@given(y=LABELS, n_devices=st.integers(1, 40), alpha=ALPHAS, seed=SEEDS)
def test_label_dirichlet_covers_once_equal_sizes_and_seeded(y: np.ndarray, n_devices: int, alpha: float,
                                                            seed: int) -> None:
    """label_dirichlet: every sample exactly once, N/n_devices samples per device (+-1), same seed -> same split."""
    parts = label_dirichlet(y, n_devices, alpha, np.random.default_rng(seed))
    assert_partition(parts, y, n_devices)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert same(parts, label_dirichlet(y, n_devices, alpha, np.random.default_rng(seed)))


@props(100)
@given(y=LABELS, n_devices=st.integers(1, 20), per_device=st.integers(1, 4), seed=SEEDS)
def test_shards_deal_equal_label_sorted_shards(y: np.ndarray, n_devices: int, per_device: int, seed: int) -> None:
    """shards: refused when there are fewer samples than shards; else every device gets `per_device` shards of
    N // n_shards samples, no sample twice, and what is dealt is the label-sorted data minus its last N mod n_shards
    samples (so the dealt class counts are those of sorted(y) cut there); same seed -> same split."""
    n_shards = n_devices * per_device
    if len(y) < n_shards:
        with pytest.raises(DataError):
            shards(y, n_devices, per_device, np.random.default_rng(seed))
        return
    parts = shards(y, n_devices, per_device, np.random.default_rng(seed))
    every = assert_partition(parts, y, n_devices, covers=False)
    size = len(y) // n_shards
    assert all(len(p) == per_device * size for p in parts)
    kept = np.sort(y)[: n_shards * size]
    assert np.array_equal(np.bincount(y[every], minlength=10), np.bincount(kept, minlength=10))
    assert same(parts, shards(y, n_devices, per_device, np.random.default_rng(seed)))


@props(100)
@given(groups=hnp.arrays(np.int64, st.integers(1, 200), elements=st.integers(0, 30)), n_devices=st.integers(1, 35))
def test_by_group_never_cuts_a_group_and_balances(groups: np.ndarray, n_devices: int) -> None:
    """by_group: refused with more devices than groups; else every sample exactly once, every group on one device,
    no device empty, loads within the biggest group of each other (biggest-first onto the lightest device), and
    deterministic."""
    ids, counts = np.unique(groups, return_counts=True)
    if n_devices > len(ids):
        with pytest.raises(DataError):
            by_group(groups, n_devices)
        return
    parts = by_group(groups, n_devices)
    assert_partition(parts, groups, n_devices)  # group sizes play the class counts
    owner = {}
    for d, p in enumerate(parts):
        assert len(p) > 0
        for g in np.unique(groups[p]):
            assert owner.setdefault(int(g), d) == d, f"group {g} cut in two"
    loads = [len(p) for p in parts]
    assert max(loads) - min(loads) <= counts.max()
    assert same(parts, by_group(groups, n_devices))


@st.composite
def held_out_case(draw: st.DrawFn) -> tuple[np.ndarray, list[np.ndarray], int]:
    y = draw(hnp.arrays(np.int64, st.integers(1, 120), elements=st.integers(0, 7)))
    hists = draw(st.lists(hnp.arrays(np.int64, st.integers(0, 10), elements=st.integers(0, 5)), min_size=1,
                          max_size=5))
    return y, hists, draw(st.integers(1, len(y)))


@props(100)
@given(case=held_out_case(), seed=SEEDS)
def test_held_out_draws_within_the_device_label_mix(case: tuple[np.ndarray, list[np.ndarray], int],
                                                    seed: int) -> None:
    """held_out: per device a sorted, duplicate-free set of test indices, only of classes the device trains on
    (all classes when none of its classes is in the test set, or it has no labels), as many as asked unless those
    classes hold fewer; same seed -> same sets."""
    y, hists, size = case
    parts = held_out(y, hists, size, np.random.default_rng(seed))
    assert len(parts) == len(hists)
    for p, hist in zip(parts, hists):
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0) and p.min() >= 0 and p.max() < len(y)
        mine = {c for c, k in enumerate(hist) if k > 0} & set(y.tolist())
        pool = [i for i in range(len(y)) if y[i] in mine] if mine else list(range(len(y)))
        assert set(p.tolist()) <= set(pool)
        assert len(p) == min(size, len(pool))
    assert same(parts, held_out(y, hists, size, np.random.default_rng(seed)))


@props(15)
@given(y=hnp.arrays(np.int64, st.integers(1, 40), elements=st.integers(0, 4)), n_devices=st.integers(1, 50),
       alpha=ALPHAS, seed=SEEDS)
def test_lazy_shards_hold_exactly_each_device_part(y: np.ndarray, n_devices: int, alpha: float, seed: int) -> None:
    """write_partition + DeviceShards: the index records each device's count and label histogram; a device's shard,
    written on demand, holds exactly its part's samples in order, with the same bytes when written again from
    another copy; a device without samples has no shard."""
    rng = np.random.default_rng(seed)
    ds = Dataset(rng.standard_normal((len(y), 1, 2, 2)).astype(np.float32), y, 5, "toy")
    parts = label_dirichlet(y, n_devices, alpha, rng)
    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(tmp) / "a", Path(tmp) / "b"]
        for f in folders:
            write_partition(ds, parts, f)
        a, b = (DeviceShards.open(f) for f in folders)
        assert len(a) == n_devices
        assert a.counts.tolist() == [len(p) for p in parts]
        assert a.label_histograms.tolist() == [np.bincount(y[p], minlength=5).tolist() for p in parts]
        for i, p in enumerate(parts):
            if len(p) == 0:
                with pytest.raises(DataError):
                    a.path(i)
                continue
            path = a.path(i)
            with np.load(path, allow_pickle=False) as z:
                assert np.array_equal(z["x"], ds.x[p]) and np.array_equal(z["y"], y[p])
            assert a.path(i) == path and path.read_bytes() == b.path(i).read_bytes()
        with pytest.raises(DataError):
            write_partition(ds, [np.zeros(0, np.int64)] * 2, Path(tmp) / "empty")


# ---------------------------------------------------------------- aggregation

DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint8]
# Values each dtype may hold and still be finite in float32 (the global dtype every update is averaged in).
_ELEMENTS = {
    np.float32: st.floats(width=32, allow_nan=False, allow_infinity=False),
    np.float64: st.floats(-1e38, 1e38),
    np.int32: st.integers(-(2**31), 2**31 - 1),
    np.int64: st.integers(-(2**40), 2**40),
    np.uint8: st.integers(0, 255),
}
ROUND, STAGE = 7, "grow-1"


@st.composite
def param_specs(draw: st.DrawFn) -> list[ParamSpec]:
    shapes = draw(st.lists(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4), min_size=1, max_size=3))
    return [ParamSpec(f"p{i}", list(s)) for i, s in enumerate(shapes)]


@st.composite
def valid_update(draw: st.DrawFn, specs: list[ParamSpec]) -> TrainUpdate:
    weights = {}
    for p in specs:
        dtype = draw(st.sampled_from(DTYPES))
        weights[p.name] = draw(hnp.arrays(dtype, tuple(p.shape), elements=_ELEMENTS[dtype]))
    metric = st.one_of(st.floats(-10, 10), st.integers(-5, 5), st.just(math.nan), st.just(math.inf),
                       st.booleans(), st.just("text"))
    metrics = draw(st.dictionaries(st.sampled_from(["loss", "acc"]), metric, max_size=2))
    n = draw(st.integers(1, 10**6).flatmap(lambda k: st.sampled_from([k, np.int64(k)])))  # counts come as either
    return TrainUpdate(ROUND, STAGE, weights, n, metrics)


CORRUPTIONS = ["nan", "posinf", "neginf", "overflow", "shape", "missing", "extra", "dtype", "samples", "round",
               "stage", "not_dict"]


@st.composite
def corrupt(draw: st.DrawFn, u: TrainUpdate, kinds: list[str]) -> TrainUpdate:
    """One way (of `kinds`) an update can be wrong: each must be dropped whatever else it holds."""
    how = draw(st.sampled_from(kinds))
    event(f"corruption: {how}")
    w = dict(u.weights)
    name = draw(st.sampled_from(sorted(w)))
    a = np.asarray(w[name])
    n, rnd, stage = u.num_samples, u.round, u.stage
    if how in ("nan", "posinf", "neginf", "overflow"):
        bad = {"nan": np.nan, "posinf": np.inf, "neginf": -np.inf, "overflow": draw(st.sampled_from([1e39, -1e300]))}
        a = a.astype(np.float64 if how == "overflow" else draw(st.sampled_from([np.float32, np.float64])))
        a.reshape(-1)[draw(st.integers(0, a.size - 1))] = bad[how]
        w[name] = a
    elif how == "shape":
        grow = draw(st.integers(-1, a.ndim - 1))
        shape = a.shape + (1,) if grow < 0 else tuple(k + (i == grow) for i, k in enumerate(a.shape))
        w[name] = np.zeros(shape, np.float32)
    elif how == "missing":
        del w[name]
    elif how == "extra":
        w["zz_extra"] = np.zeros(2, np.float32)
    elif how == "dtype":
        w[name] = a.astype(draw(st.sampled_from([bool, np.complex64, str, object])))
    elif how == "samples":
        n = draw(st.sampled_from([0, -1, -(10**6), True, False, 3.0, None, "12", np.float64(5)]))
    elif how == "round":
        rnd = draw(st.sampled_from([ROUND - 1, ROUND + 1]))
    elif how == "stage":
        stage = "grow-2"
    else:
        w = list(w.values())  # type: ignore[assignment]
    return TrainUpdate(rnd, stage, w, n, u.metrics)


@st.composite
def round_case(draw: st.DrawFn, kinds: list[str] = CORRUPTIONS, at_least: int = 0
               ) -> tuple[list[ParamSpec], list[tuple[TrainUpdate, bool, int | None]]]:
    """Expected arrays, then a round's updates in arrival order: (update, valid?, the server's count or None), at
    least `at_least` of them invalid."""
    specs = draw(param_specs())
    oks = draw(st.lists(st.booleans(), max_size=6)) + [False] * at_least
    oks = draw(st.permutations(oks))
    out = []
    for ok in oks:
        u = draw(valid_update(specs))
        out.append((u if ok else draw(corrupt(u, kinds)), ok, draw(st.one_of(st.none(), st.integers(1, 10**6)))))
    return specs, out


def reference_mean(updates: list[tuple[TrainUpdate, int]], names: list[str]) -> dict[str, np.ndarray]:
    """Sample-weighted mean in float64, each array first rounded to the global dtype float32 (the documented rule)."""
    total = float(sum(w for _, w in updates))
    return {n: sum(w * np.asarray(u.weights[n]).astype(np.float32).astype(np.float64) for u, w in updates) / total
            for n in names}


def assert_close_to(got: np.ndarray, ref: np.ndarray, scale: float) -> None:
    """float32 result vs float64 reference. The product sums in float64 too, so the two differ by float64 rounding
    (~1e-16 of the largest term, whatever the order) plus the final cast to float32 (half an ulp: 2**-24 relative):
    rtol 2**-23 covers the cast with room, atol 1e-12 x the largest magnitude covers a mean that cancels to near 0,
    and 1e-44 the float32 subnormals."""
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=2**-23, atol=1e-12 * scale + 1e-44)


def run_round(specs: list[ParamSpec], updates: list[tuple[TrainUpdate, bool, int | None]], order: list[int],
              min_updates: int) -> Aggregator:
    """Add `updates` in `order` (device id = position); each must be accepted iff valid, a drop giving a reason."""
    agg = Aggregator(specs, min_updates=min_updates, round=ROUND, stage=STAGE)
    for i in order:
        u, ok, cap = updates[i]
        reason = agg.add(u, device=i, max_samples=cap)
        assert (reason is None) == ok, f"update {i} valid={ok}, add() said {reason!r}"
        assert reason is None or (isinstance(reason, str) and reason)
    return agg


def check_round(specs: list[ParamSpec], updates: list[tuple[TrainUpdate, bool, int | None]],
                data: st.DataObject) -> None:
    """Drop decisions, weights, result (None below min_updates accepted), metrics and order independence of one
    round against the references."""
    names = [p.name for p in specs]
    min_updates = data.draw(st.integers(0, 3))
    agg = run_round(specs, updates, list(range(len(updates))), min_updates)
    valid = [(u, min(u.num_samples, cap) if cap else u.num_samples, i) for i, (u, ok, cap) in enumerate(updates) if ok]
    assert agg.accepted == len(valid) and agg.total_samples == sum(w for _, w, _ in valid)
    assert agg.weights == {i: w for _, w, i in valid}
    assert [who for who, _ in agg.dropped] == [i for i, (_, ok, _) in enumerate(updates) if not ok]
    sums: dict[str, float] = {}
    mass: dict[str, float] = {}
    for u, w, _ in valid:
        for k, v in u.metrics.items():
            if type(v) in (int, float) and math.isfinite(v):
                sums[k], mass[k] = sums.get(k, 0.0) + w * v, mass.get(k, 0.0) + w
    got = agg.metrics()
    assert sorted(got) == sorted(sums)
    for k in sums:
        assert math.isclose(got[k], sums[k] / mass[k], rel_tol=1e-12, abs_tol=1e-12)
    result = agg.result()
    if len(valid) < max(1, min_updates):  # too few to move the model: keep the old weights
        assert result is None
        return
    assert result is not None and sorted(result) == sorted(names)
    ref = reference_mean([(u, w) for u, w, _ in valid], names)
    scale = {n: max([float(np.max(np.abs(np.asarray(u.weights[n], np.float64)), initial=0)) for u, _, _ in valid])
             for n in names}
    for n in names:
        assert_close_to(result[n], ref[n], scale[n])
    shuffled = run_round(specs, updates, data.draw(st.permutations(range(len(updates)))), min_updates).result()
    assert shuffled is not None
    for n in names:
        assert_close_to(shuffled[n], ref[n], scale[n])


@props(100)
@given(case=round_case(), data=st.data())
def test_aggregator_is_the_weighted_mean_of_the_valid_updates(
        case: tuple[list[ParamSpec], list[tuple[TrainUpdate, bool, int | None]]], data: st.DataObject) -> None:
    """Aggregator: every invalid update (NaN/Inf anywhere, too large for float32, wrong shape, missing or unknown
    array, non-numeric dtype, non-positive or non-integer sample count, stale round, other stage, weights not a
    dict) is dropped with a reason, every valid one accepted; the result is the sample-weighted mean (counts capped
    by the server's) of the valid ones, and so are the metrics; any arrival order gives the same decisions and the
    same result within float tolerance."""
    check_round(*case, data)


@pytest.mark.parametrize("how", CORRUPTIONS)
@props(12)
@given(data=st.data())
def test_aggregator_drops_every_kind_of_invalid_update(how: str, data: st.DataObject) -> None:
    """The same property with at least one update broken in this one way: hypothesis's choice among all kinds
    favours the first few, and every kind must be seen dropped in every run."""
    check_round(*data.draw(round_case([how], at_least=1)), data)


@props(60)
@given(specs=param_specs(), data=st.data())
def test_merge_replaces_the_averaged_arrays_in_the_global_dtype(specs: list[ParamSpec], data: st.DataObject) -> None:
    """Aggregator.merge: a new dict whose averaged arrays are the result in each global array's dtype (rounded for
    integers), every other array the very same object, the global dict untouched; no result -> the global model;
    an array the global model lacks, or of another shape, is an error."""
    glob: dict[str, np.ndarray] = {}
    for p in specs:
        dtype = data.draw(st.sampled_from([np.float32, np.float64, np.int64]))
        glob[p.name] = np.zeros(p.shape, dtype)
    glob["frozen"] = np.ones(3, np.float32)
    before = dict(glob)
    averaged = data.draw(st.lists(st.sampled_from([p.name for p in specs]), unique=True))
    result = {n: data.draw(hnp.arrays(np.float32, glob[n].shape, elements=st.floats(-1e6, 1e6, width=32)))
              for n in averaged}
    merged = Aggregator.merge(glob, result)
    assert glob == before and sorted(merged) == sorted(glob)
    for n, old in glob.items():
        if n not in result:
            assert merged[n] is old
            continue
        assert merged[n].dtype == old.dtype and merged[n].shape == old.shape
        want = [float(round(float(v))) if old.dtype.kind == "i" else float(v) for v in result[n].reshape(-1)]
        assert merged[n].astype(np.float64).reshape(-1).tolist() == want  # round(): half to even, as np.rint
    assert Aggregator.merge(glob, None) == glob
    with pytest.raises(ManifestError):
        Aggregator.merge(glob, {"unknown": np.zeros(1, np.float32)})
    with pytest.raises(ManifestError):
        Aggregator.merge(glob, {"frozen": np.zeros(4, np.float32)})


@st.composite
def slice_case(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], list[tuple[str, tuple[np.ndarray, ...], np.ndarray,
                                                                          float]]]:
    """Global float32 arrays, then updates: (name, one duplicate-free index array per axis in any order, the slice's
    values, a positive weight). Not every update holds every array."""
    shapes = draw(st.lists(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5), min_size=1, max_size=2))
    finite = st.floats(-1e6, 1e6, width=32)
    glob = {f"a{i}": draw(hnp.arrays(np.float32, s, elements=finite)) for i, s in enumerate(shapes)}
    ups = []
    for _ in range(draw(st.integers(0, 5))):
        for name in draw(st.lists(st.sampled_from(sorted(glob)), unique=True, min_size=1)):
            index = []
            for n in glob[name].shape:
                perm = draw(st.permutations(range(n)))
                index.append(np.asarray(perm[: draw(st.integers(1, n))], np.int64))
            value = draw(hnp.arrays(np.float32, tuple(len(i) for i in index), elements=finite))
            ups.append((name, tuple(index), value, draw(st.floats(1e-3, 1e4))))
    return glob, ups


@props(100)
@given(case=slice_case())
def test_slice_average_is_per_element_weighted_mean(
        case: tuple[dict[str, np.ndarray], list[tuple[str, tuple[np.ndarray, ...], np.ndarray, float]]]) -> None:
    """SliceAverage: each element of a global array is the weighted mean over the updates whose slice held it,
    computed here element by element; an element no update held keeps its global value exactly; only the arrays
    some update held are returned."""
    glob, ups = case
    avg = SliceAverage()
    for name, index, value, weight in ups:
        avg.add(name, glob[name].shape, index, value, weight)
    out = avg.result(glob)
    assert sorted(out) == sorted({name for name, *_ in ups})
    for name, got in out.items():
        sums: dict[tuple[int, ...], float] = {}
        mass: dict[tuple[int, ...], float] = {}
        for n, index, value, weight in ups:
            if n != name:
                continue
            for local in itertools.product(*(range(len(i)) for i in index)):
                at = tuple(int(i[j]) for i, j in zip(index, local))
                sums[at] = sums.get(at, 0.0) + weight * float(value[local])
                mass[at] = mass.get(at, 0.0) + weight
        ref = glob[name].astype(np.float64)
        for at in sums:
            ref[at] = sums[at] / mass[at]
        held = np.zeros(ref.shape, bool)
        for at in sums:
            held[at] = True
        assert np.array_equal(got[~held], glob[name][~held])
        assert_close_to(got, ref, float(np.max(np.abs(ref), initial=0)) + 1e6)


# ---------------------------------------------------------------- sizing

@st.composite
def memory_table(draw: st.DrawFn, backend: str) -> list[MemoryPoint]:
    """Memory points of one backend as an export writes them: estimates at a few micro-batches, measured peaks at
    some (none, one or several: the model is then the measured point, a line through them, or the estimate)."""
    batches = draw(st.lists(st.sampled_from([1, 2, 4, 8, 16, 32, 64]), min_size=1, max_size=4, unique=True))
    mb = st.floats(1.0, 4000.0)
    return [MemoryPoint(b, draw(st.one_of(st.none(), mb)), draw(mb), backend=backend) for b in batches]


@st.composite
def sized_stage(draw: st.DrawFn) -> Stage:
    """A stage with ORT and torch memory tables (no ExecuTorch files), with or without BatchNorm."""
    bn = {"bn.running_var": [1.0, 0.1]} if draw(st.booleans()) else {}
    ref = FileRef("x", "0" * 64, 1)
    return Stage(index=0, name="grow-0", kind="grow", block=0, loss="ce", loss_config={}, optimizer={}, inputs=[],
                 feature=TensorSpec("features", [-1, 1]), params=[ParamSpec("w", [2])], session_params={},
                 bn_updates={}, bn_variance=bn, files={"training": ref, "torch.training": ref}, footprint={},
                 memory=draw(memory_table("ort")) + draw(memory_table("torch")))


def allowed_micro_batches(batch: int, bn: bool) -> list[int]:
    """batch, batch/2, ... (rounded down) and the smallest the stage trains with (2 with BatchNorm, else 1; never
    above batch), largest first."""
    smallest = min(batch, 2 if bn else 1)
    halvings = {batch >> k for k in range(batch.bit_length())}
    return sorted({m for m in halvings if m >= smallest} | {smallest}, reverse=True)


@st.composite
def budgets(draw: st.DrawFn, stage: Stage, batch: int, margin: float, backend: str) -> float:
    """A budget anywhere, or exactly at / one ulp either side of the budget where some micro-batch just fits."""
    edges = [predicted_peak_mb(stage, m, backend) / (1.0 - margin)
             for m in allowed_micro_batches(batch, bool(stage.bn_variance))]
    edge = draw(st.sampled_from(edges))
    near = np.nextafter(edge, draw(st.sampled_from([-np.inf, np.inf]))) if draw(st.booleans()) else edge
    return draw(st.one_of(st.floats(0.0, 6000.0), st.just(float(near))))


BATCHES = st.sampled_from([1, 2, 3, 5, 8, 16, 32, 48, 64])
MARGINS = st.floats(0.0, 0.5)


def check_sizing(z: Sizing, stage: Stage, budget: float, batch: int, margin: float, backend: str) -> None:
    """The sizing contract against the stage's memory model, checked micro-batch by micro-batch."""
    limit = budget * (1.0 - margin)
    allowed = allowed_micro_batches(batch, bool(stage.bn_variance))
    peak = {m: predicted_peak_mb(stage, m, backend) for m in allowed}
    fitting = [m for m in allowed if peak[m] <= limit]
    assert z.budget_mb == budget
    event(f"sizing: {'fits at ' + ('the batch' if fitting[0] == batch else 'a smaller one') if fitting else 'refused'}")
    if not fitting:  # not even the smallest micro-batch holds: the device cannot take part
        assert peak[allowed[-1]] > limit
        assert (z.fits, z.micro_batch, z.accum_steps) == (False, 0, 0)
        assert z.peak_mb == round(peak[allowed[-1]], 1)
        return
    assert z.fits and z.micro_batch == max(fitting), f"picked {z.micro_batch} of fitting {fitting}"
    assert peak[z.micro_batch] <= limit
    assert z.accum_steps == math.ceil(batch / z.micro_batch) and z.micro_batch * z.accum_steps >= batch
    assert z.peak_mb == round(peak[z.micro_batch], 1)


@props(150)
@given(stage=sized_stage(), batch=BATCHES, margin=MARGINS, backend=st.sampled_from(["ort", "torch"]), data=st.data())
def test_size_stage_picks_the_largest_micro_batch_under_budget(stage: Stage, batch: int, margin: float,
                                                               backend: str, data: st.DataObject) -> None:
    """size_stage: the micro-batch never predicts a peak over budget x (1 - margin), is the largest allowed one that
    does not, and keeps the logical batch by accumulation; a device no allowed micro-batch fits is refused; a backend
    the stage was not exported for fits nowhere."""
    budget = data.draw(budgets(stage, batch, margin, backend))
    check_sizing(size_stage(stage, budget, batch, margin, backend=backend), stage, budget, batch, margin, backend)
    assert not size_stage(stage, budget, batch, margin, backend="executorch").fits


@props(60)
@given(stage=sized_stage(), batch=BATCHES, margin=MARGINS, data=st.data())
def test_stage_sizer_agrees_with_size_stage_for_every_device(stage: Stage, batch: int, margin: float,
                                                             data: st.DataObject) -> None:
    """StageSizer (few size_stage calls for a fleet) gives every device exactly DeviceInfo.sizing's answer, whatever
    the order devices come in, with budgets repeated and on the edges; eligible() keeps exactly the devices that
    fit."""
    fleet = []
    for i in range(data.draw(st.integers(1, 40))):
        backend = data.draw(st.sampled_from(["ort", "torch", "executorch"]))
        budget = data.draw(budgets(stage, batch, margin, "torch" if backend == "torch" else "ort"))
        fleet.append(DeviceInfo(i, budget, 10, np.ones(2), backend=backend))
    sizer = StageSizer(stage, batch, margin)
    for d in fleet:
        want = size_stage(stage, d.budget_mb, batch, margin, backend=d.backend)
        assert sizer(d) == want == d.sizing(stage, batch, margin), f"device {d.id} ({d.backend}, {d.budget_mb} MB)"
        if d.backend != "executorch":
            check_sizing(want, stage, d.budget_mb, batch, margin, d.backend)
    assert [d.id for d in eligible(fleet, stage, batch, margin)] == [
        d.id for d in fleet if size_stage(stage, d.budget_mb, batch, margin, backend=d.backend).fits]
