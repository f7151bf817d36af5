"""Ways to split one training set across simulated devices.

Every function returns a list of sorted int64 index arrays, one per device,
pairwise disjoint. All but ``shards`` cover every sample. Randomness comes only
from the numpy Generator passed in, so a seed reproduces a partition exactly.

A sample belongs to one device at most, so with more devices than samples some
devices get none (iid, label-dirichlet; dirichlet once it cannot keep its
floor): a fleet larger than the data is a real set-up (most devices of a
cross-device federation never train), and the simulation registers those
devices but never selects them. ``shards`` refuses instead: it promises each
device two label shards.
"""

from __future__ import annotations

import numpy as np

from .errors import DataError


def _check(n_samples: int, n_devices: int) -> None:
    if n_devices < 1:
        raise DataError(f"n_devices must be >= 1, got {n_devices}")
    if n_samples < 1:
        raise DataError("no samples to split")


def iid(y: np.ndarray, n_devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random, equal-size (+-1) parts: the homogeneous baseline (empty ones beyond one per sample)."""
    _check(len(y), n_devices)
    perm = rng.permutation(len(y))
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, n_devices)]


def dirichlet(
    y: np.ndarray,
    n_devices: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al. 2019; the NIID-Bench variant).

    For every class, device shares are drawn from Dir(alpha); devices that
    already hold more than N/n_devices samples get no more. Small alpha ->
    few classes per device. Redraws until every device has ``min_size``
    samples; after ``max_tries`` failed draws raises DataError. When the data
    cannot give every device ``min_size`` (min_size x n_devices > N) there is
    no floor: the first draw is kept, and may leave devices empty.
    """
    y = np.asarray(y)
    n = len(y)
    _check(n, n_devices)
    if alpha <= 0:
        raise DataError(f"alpha must be > 0, got {alpha}")
    if min_size * n_devices > n:
        min_size = 0
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(n_devices, alpha))
            p = p * np.array([len(d) < n / n_devices for d in parts])
            total = p.sum()
            p = p / total if total > 0 else np.full(n_devices, 1.0 / n_devices)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for d, chunk in zip(parts, np.split(idx, cuts)):
                d.extend(chunk.tolist())
        if min(len(d) for d in parts) >= min_size:
            return [np.sort(np.asarray(d, np.int64)) for d in parts]
    raise DataError(
        f"dirichlet(alpha={alpha}) gave a device fewer than {min_size} samples "
        f"in {max_tries} tries; raise alpha or lower min_size/n_devices"
    )


def label_dirichlet(y: np.ndarray, n_devices: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Equal-size devices whose label mixes are drawn from Dir(alpha) (Hsu et al. 2019's scheme).

    Unlike ``dirichlet`` (which splits each class across devices and lets sizes vary), every device gets
    N/n_devices samples (+-1), so a strong skew (alpha 0.1) still leaves every device real local work. Devices
    fill in random order from what is left of each class; once a class runs out, the device's remaining draws
    follow its mix over the classes still available. Covers every sample; with more devices than samples the
    last devices to fill get none.
    """
    y = np.asarray(y)
    _check(len(y), n_devices)
    if alpha <= 0:
        raise DataError(f"alpha must be > 0, got {alpha}")
    classes = np.unique(y)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in classes]
    sizes = [len(a) for a in np.array_split(np.arange(len(y)), n_devices)]
    parts: list[np.ndarray] = [np.zeros(0, np.int64)] * n_devices
    for d in rng.permutation(n_devices):
        mix, need, take = rng.dirichlet(np.full(len(classes), alpha)), sizes[d], []
        while need > 0:
            avail = np.array([len(p) for p in pools])
            q = mix * (avail > 0)
            q = q / q.sum() if q.sum() > 0 else (avail > 0) / (avail > 0).sum()
            counts = np.minimum(rng.multinomial(need, q), avail)
            for c, k in enumerate(counts):
                take += pools[c][:k]
                del pools[c][:k]
            need -= int(counts.sum())
        parts[d] = np.sort(np.asarray(take, np.int64))
    return parts


def shards(
    y: np.ndarray, n_devices: int, shards_per_device: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. 2017.

    Samples are sorted by label (random order within a class), cut into
    ``n_devices * shards_per_device`` equal shards and dealt out at random.
    The last ``N mod n_shards`` sorted samples are dropped, so this partition
    may not cover the whole dataset.
    """
    y = np.asarray(y)
    if shards_per_device < 1:
        raise DataError(f"shards_per_device must be >= 1, got {shards_per_device}")
    n_shards = n_devices * shards_per_device
    _check(len(y), n_devices)
    size = len(y) // n_shards
    if size == 0:
        raise DataError(f"the shards partition deals {shards_per_device} label shards to every device: {len(y)} "
                        f"samples are too few for {n_devices} devices (at most {len(y) // shards_per_device}); use "
                        f"fewer devices or another partition")
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")][: n_shards * size]
    pieces = order.reshape(n_shards, size)
    dealt = rng.permutation(n_shards).reshape(n_devices, shards_per_device)
    return [np.sort(pieces[row].reshape(-1)).astype(np.int64) for row in dealt]


def by_group(groups: np.ndarray, n_devices: int) -> list[np.ndarray]:
    """Natural split by owner (FEMNIST writer): no group is ever cut in two.

    With as many devices as groups each device is one writer; with fewer,
    whole writers are packed onto devices, biggest first onto the device with
    fewest samples, to keep sizes balanced. Deterministic (no randomness).
    """
    groups = np.asarray(groups) if groups is not None else np.zeros(0)
    if groups.ndim != 1 or len(groups) == 0:
        raise DataError("by_group needs a non-empty 1-D group id per sample (dataset has no groups?)")
    ids, counts = np.unique(groups, return_counts=True)
    if n_devices < 1:
        raise DataError(f"n_devices must be >= 1, got {n_devices}")
    if n_devices > len(ids):
        raise DataError(f"cannot split {len(ids)} groups across {n_devices} devices")
    load = np.zeros(n_devices, np.int64)
    device_of = np.empty(len(ids), np.int64)  # indexed like ids
    for k in np.argsort(-counts, kind="stable"):
        d = int(np.argmin(load))
        device_of[k] = d
        load[d] += counts[k]
    dev = device_of[np.searchsorted(ids, groups)]
    return [np.flatnonzero(dev == d).astype(np.int64) for d in range(n_devices)]


def held_out(y: np.ndarray, label_histograms: list[np.ndarray], size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each device's own held-out set for federated evaluation: `size` samples of a test set drawn with the label
    mix of the device's training data (its histogram), without replacement within a device; devices may share
    samples. A device whose training data has no labels, or only classes the test set lacks, gets a uniform draw."""
    if size < 1 or size > len(y):
        raise DataError(f"held-out size must be in [1, {len(y)}], got {size}")
    counts = np.bincount(y)  # >= 1 for every label in y
    parts = []
    for hist in label_histograms:
        h = np.zeros(len(counts))
        h[: len(hist)] = np.asarray(hist, np.float64)[: len(h)]
        p = np.where(h[y] > 0, h[y] / counts[y], 0.0)
        if not p.any():  # no labels, or none the test set has: uniform
            p = np.ones(len(y))
        k = min(size, int(np.count_nonzero(p)))
        parts.append(np.sort(rng.choice(len(y), size=k, replace=False, p=p / p.sum())).astype(np.int64))
    return parts
