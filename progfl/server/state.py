"""Server checkpoints, written every round so a run resumes exactly (same weights, same random stream).

Layout of `run_dir/checkpoint/`: `arrays.npz` (the global model), `extra.npz` (arrays found inside the
other fields, e.g. the pace window), `state.json` (everything else, with the sha256 of both npz files).
A new checkpoint is built in a temporary folder, fsynced, then renamed into place; the one it replaces is kept as
`checkpoint.old` (the previous round's). So a crash never leaves only a half-written checkpoint, and a checkpoint
damaged on disk costs one round: `load_state` falls back to the previous one, and the run redoes that round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATE_VERSION = 1
CHECKPOINT = "checkpoint"
PREVIOUS = "checkpoint.old"
_TMP_PREFIX = ".checkpoint.tmp."

log = logging.getLogger("progfl.server")


class StateError(ValueError):
    """A checkpoint that is missing or cannot be trusted."""


@dataclass
class ServerState:
    round: int
    plan: str
    plan_state: dict[str, Any]  # JSON-able: stage position etc.
    arrays: dict[str, np.ndarray]  # the global model
    pace: dict[str, Any]  # PaceController.state_dict()
    rng: dict[str, Any]  # np.random.Generator.bit_generator.state
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def restore_rng(state: dict[str, Any]) -> np.random.Generator:
    """A Generator that continues the stream whose bit_generator.state was saved."""
    bit = getattr(np.random, state["bit_generator"])()
    bit.state = state
    return np.random.Generator(bit)


def _split(obj: Any, extra: dict[str, np.ndarray]) -> Any:
    """Replace arrays by {"__array__": key} (arrays go to `extra`) and numpy scalars by Python ones."""
    if isinstance(obj, np.ndarray):
        key = f"x{len(extra)}"
        extra[key] = obj
        return {"__array__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _split(v, extra) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, extra) for v in obj]
    return obj


def _join(obj: Any, extra: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return extra[obj["__array__"]]
        return {k: _join(v, extra) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, extra) for v in obj]
    return obj


def _write(path: Path, write) -> str:
    """Write a file through `write(fh)`, fsync it, return its sha256."""
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(state: ServerState, run_dir: str | os.PathLike) -> Path:
    """Write `run_dir/checkpoint/` atomically (see the module docstring); returns its path."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    for stale in run.glob(_TMP_PREFIX + "*"):  # left by a save that crashed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=run))
    try:
        names = list(state.arrays)
        model = {f"a{i}": np.asarray(state.arrays[n]) for i, n in enumerate(names)}
        extra: dict[str, np.ndarray] = {}
        rest = _split({k: v for k, v in vars(state).items() if k != "arrays"}, extra)
        doc = {
            "version": STATE_VERSION,
            "names": names,
            "sha256": {
                "arrays.npz": _write(tmp / "arrays.npz", lambda fh: np.savez(fh, **model)),
                "extra.npz": _write(tmp / "extra.npz", lambda fh: np.savez(fh, **extra)),
            },
            **rest,
        }
        _write(tmp / "state.json", lambda fh: fh.write(json.dumps(doc).encode()))
        _fsync_dir(tmp)
        final, previous = run / CHECKPOINT, run / PREVIOUS
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(tmp, final)
        _fsync_dir(run)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_state(run_dir: str | os.PathLike) -> ServerState:
    """The last intact checkpoint of a run, exactly as saved: `checkpoint/`, else (missing or damaged) the previous
    round's `checkpoint.old`, with a warning. StateError if neither can be trusted."""
    run = Path(run_dir)
    paths = [p for p in (run / CHECKPOINT, run / PREVIOUS) if (p / "state.json").exists()]
    if not paths:
        raise StateError(f"{run}: no checkpoint to resume from")
    errors = []
    for path in paths:
        try:
            state = _load(path)
        except StateError as e:
            errors.append(e)
            continue
        if errors:
            log.warning("%s; resuming from the previous checkpoint (round %d), whose next round is redone",
                        errors[0], state.round)
        return state
    raise errors[0]


def _load(path: Path) -> ServerState:
    try:
        doc = json.loads((path / "state.json").read_text())
        if doc.get("version") != STATE_VERSION:
            raise StateError(f"{path}: checkpoint version {doc.get('version')}, this progfl reads {STATE_VERSION}")
        loaded = {}
        for fname in ("arrays.npz", "extra.npz"):
            data = (path / fname).read_bytes()
            if hashlib.sha256(data).hexdigest() != doc["sha256"][fname]:
                raise StateError(f"{path / fname}: does not match its sha256 (corrupt checkpoint)")
            with np.load(path / fname, allow_pickle=False) as z:
                loaded[fname] = {k: z[k] for k in z.files}
        arrays = {n: loaded["arrays.npz"][f"a{i}"] for i, n in enumerate(doc["names"])}
        rest = _join({k: doc[k] for k in ("plan_state", "pace", "rng", "history", "config")}, loaded["extra.npz"])
        return ServerState(round=int(doc["round"]), plan=doc["plan"], arrays=arrays, **rest)
    except StateError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StateError(f"{path}: corrupt checkpoint ({type(e).__name__}: {msg})") from None
