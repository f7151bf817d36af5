"""Fault injection, as figures: what progfl notices, what it loses, what poison it lets through.

Each fault is injected in N trials (--trials, default 3; --quick: 1) on a tiny CNN (width 4) on sklearn digits (8x8),
6 devices, 4 a round, 3 rounds, 1-2 local epochs, 2 worker processes. Columns of the table:

    detected       trials in which progfl noticed the fault (a failed device in the round record's `failed`, an
                   update in `dropped`, a refusal with exit code 2 and its one-line reason, a re-sent file ...)
    rounds lost    completed rounds whose work was lost (a run that must start over; a round recorded with nothing
                   because of the fault while the others could have trained). A round redone after a resume from
                   the last checkpoint loses 0 completed rounds.
    wrong accepts  poisoned updates that were averaged into the global model

Faults: kill -9 of a device job process and of the server (`progfl simulate`, local transport); poisoned updates fed
to the round engine (RoundEngine.configure -> honest devices on DevicePool -> one update replaced -> aggregate ->
commit); corrupt artifacts (before a run; in a Flower node's cache between rounds, on Flower's simulation engine);
corrupt checkpoints; kill -9, SIGSTOP/SIGCONT and kill + restart of a SuperNode in a loopback Flower deployment
(tests/loopback.Deployment: a SuperLink and 3 SuperNodes, `flwr run`).

    python benchmarks/faults.py [--trials 3 | --quick] [--only kill-device,poison-nan,...] [--out DIR]

Results go to benchmarks/results/faults.{json,md}, rewritten after every trial. Every process started here is
stopped by pid (and checked for at the end: none may be left).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

# Light imports only at the top: the device job processes (forkserver children) import this main module again.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))  # tests/loopback.py: the loopback Flower deployment and /proc helpers

PY = sys.executable
APP = ROOT / "progfl" / "flower_app"
PACE = {"window": 2, "slope_window": 2, "min_rounds": 1}
DEVICES, PER_ROUND, ROUNDS = 6, 4, 3
LR = 0.05
ROUND_TIMEOUT, QUERY_TIMEOUT = 30.0, 20.0  # the loopback deployment's
STOP_SECONDS = 45.0  # SIGSTOP of a SuperNode: longer than the round timeout


# ---------------------------------------------------------------------------------------------- small helpers
def now() -> float:
    return time.perf_counter()


def flip_byte(path: Path, offset: int | None = None) -> int:
    """XOR one byte (the middle one by default) with 0xFF; returns its offset."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return i


def rounds_done(run: Path) -> int:
    try:
        return len(json.loads((run / "history.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def history(run: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((run / "history.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def checkpoint_round(run: Path) -> int | None:
    for c in ("checkpoint", "checkpoint.old"):
        try:
            return int(json.loads((run / c / "state.json").read_text())["round"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children(pid: int, table: dict[int, tuple[int, int, int]]) -> list[int]:
    return sorted(c for c, (ppid, _, _) in table.items() if ppid == pid)


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class Tracker:
    """Every process this benchmark starts (pid -> start time), to prove none is left at the end."""

    def __init__(self) -> None:
        self.seen: dict[int, int | None] = {}
        self.sessions: set[int] = set()

    def add(self, pid: int, t: int | None = None) -> None:
        from loopback import start_time

        self.seen.setdefault(pid, t if t is not None else start_time(pid))

    def add_tree(self, pid: int) -> None:
        from loopback import _table, descendants

        table = _table()
        for p in [pid, *descendants(pid, table)]:
            if p in table:
                self.seen.setdefault(p, table[p][2])

    def scan_sessions(self) -> None:
        from loopback import _table

        for pid, (_, sid, t) in _table().items():
            if sid in self.sessions:
                self.seen.setdefault(pid, t)

    def live(self) -> list[int]:
        from loopback import alive, start_time

        self.scan_sessions()
        return sorted(p for p, t in self.seen.items() if alive(p) and (t is None or start_time(p) == t))


TRACK = Tracker()


def popen(argv: list[str], log: Path, **kw) -> subprocess.Popen:
    fh = open(log, "w")
    p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env(), cwd=ROOT,
                         start_new_session=True, **kw)
    fh.close()
    TRACK.sessions.add(p.pid)
    TRACK.add(p.pid)
    return p


def run_cli(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """A CLI run to its end; its process and session are tracked."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                         env=env(), cwd=ROOT, start_new_session=True)
    TRACK.sessions.add(p.pid)
    TRACK.add(p.pid)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def kill_tree(pids: list[int], seen: dict[int, int | None]) -> None:
    from loopback import alive, start_time

    for p in pids:
        if alive(p) and (seen.get(p) is None or start_time(p) == seen.get(p)):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------------------------- the setting
@dataclasses.dataclass
class Ctx:
    work: Path
    art: Path
    fleet: list[float]
    fleet_file: Path
    trials: int
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)


def make_artifacts(work: Path) -> tuple[Path, list[float]]:
    """The tests' tiny CNN (width 4, 1x8x8, grow/distill/full stages), and a fleet in which every device holds
    every stage (so the faults, not memory, decide who trains)."""
    import torch

    from progfl.exporter import export_model
    from progfl.manifest import DeviceClass, Manifest
    from progfl.models import build_model
    from progfl.server.fleet import required_mb

    torch.manual_seed(0)
    art = work / "artifacts"
    export_model(build_model("cnn", 10, (1, 8, 8), width=4), art, [DeviceClass("any", 4096.0)],
                 kinds=("grow", "distill", "full"), batch_size=16, measure_batches=[1, 16], backends=("ort",))
    m = Manifest.load(art)
    top = max(required_mb(m, s.name) for s in m.stages)
    return art, [round(top + 5.0 + 3.0 * i, 1) for i in range(DEVICES)]


def sim_argv(ctx: Ctx, out: Path, seed: int, epochs: int = 1, plan: str = "profl", art: Path | None = None,
             resume: bool = False) -> list[str]:
    argv = [PY, "-m", "progfl.cli", "simulate", "--plan", plan, "--artifacts", str(art or ctx.art), "--out", str(out),
            "--dataset", "digits", "--fleet", str(ctx.fleet_file), "--per-round", str(PER_ROUND), "--rounds",
            str(ROUNDS), "--epochs", str(epochs), "--lr", str(LR), "--seed", str(seed), "--workers", "2"]
    for k, v in PACE.items():
        argv += ["--pace", f"{k}={v}"]
    return argv + (["--resume"] if resume else [])


def sim_config(ctx: Ctx, out: Path, seed: int, plan: str = "profl", epochs: int = 1, **kw):
    """The SimConfig `progfl simulate` builds from sim_argv's options (a CLI --resume must find the same config)."""
    from progfl.server.simulation import SimConfig

    return SimConfig(plan=plan, artifacts=str(ctx.art), out=str(out), dataset="digits", devices=DEVICES,
                     per_round=PER_ROUND, rounds=ROUNDS, epochs=epochs, lr=LR, seed=seed, workers=2,
                     fleet=list(ctx.fleet), pace=dict(PACE), **kw)


class SimWatch:
    """A `progfl simulate` subprocess watched through /proc: its device job processes are the children of the
    multiprocessing forkserver, itself a child of the simulate process."""

    def __init__(self, argv: list[str], out: Path, log: Path):
        self.out = out
        self.p = popen(argv, log)
        self.log = log
        self.seen: dict[int, int | None] = {}
        self.names: dict[int, str] = {}

    def jobs(self) -> list[tuple[int, int]]:
        from loopback import _table, descendants

        table = _table()
        for pid in descendants(self.p.pid, table):
            if pid not in self.seen:
                self.seen[pid] = table[pid][2]
                name = cmdline(pid)
                self.names[pid] = ("forkserver" if "forkserver" in name else "resource tracker"
                                   if "resource_tracker" in name else "device job")
                TRACK.add(pid, table[pid][2])
        servers = [c for c in children(self.p.pid, table) if self.names.get(c) == "forkserver"]
        jobs = [(j, table[j][2]) for s in servers for j in children(s, table)]
        for j, _ in jobs:
            self.names[j] = "device job"
        return jobs

    def wait_for_job(self, in_round: int, timeout: float = 300) -> tuple[int, int, int] | None:
        """(job pid, its start time, the round it trains) once a device job of round >= in_round is alive."""
        deadline = time.time() + timeout
        while self.p.poll() is None and time.time() < deadline:
            jobs = self.jobs()
            if jobs:
                done = rounds_done(self.out)  # a job alive now belongs to the round after the last one written
                if done + 1 >= in_round:
                    pid, t = jobs[0]
                    return pid, t, done + 1
            time.sleep(0.003)
        return None


# ---------------------------------------------------------------------------------------------- 1. kill a device job
def fault_kill_device(ctx: Ctx, trial: int) -> dict[str, Any]:
    from loopback import start_time

    out = ctx.work / "kill_device" / f"t{trial}"
    out.parent.mkdir(parents=True, exist_ok=True)
    target = 1 + trial % ROUNDS
    w = SimWatch(sim_argv(ctx, out, seed=trial, epochs=2), out, out.parent / f"t{trial}.log")
    killed = None
    while killed is None:
        found = w.wait_for_job(target)
        if found is None:
            break
        pid, t, rnd = found
        if start_time(pid) == t:
            os.kill(pid, signal.SIGKILL)
            killed = (pid, rnd)
    try:
        rc = w.p.wait(timeout=300)
    except subprocess.TimeoutExpired:
        w.p.kill()
        rc = None
    time.sleep(0.5)
    from loopback import alive

    left = [p for p in w.seen if alive(p)]
    kill_tree(left, w.seen)
    h = history(out)
    if killed is None:
        return {"detected": False, "rounds_lost": None, "wrong_accepts": None, "ok": False,
                "detail": f"no device job seen alive in round {target}: nothing was killed (exit {rc})"}
    rec = next((r for r in h if r["round"] == killed[1]), None)
    failed = rec["failed"] if rec else []
    sig9 = [f for f in failed if "signal 9" in f[1]]
    others_failed = [(r["round"], r["failed"]) for r in h if r["failed"] and r is not rec]
    lost = (ROUNDS - len(h)) + sum(1 for r in h if r["kept_previous"] and r["failed"])
    ok = rc == 0 and len(h) == ROUNDS and len(sig9) == 1 and not others_failed
    return {"detected": bool(sig9), "rounds_lost": lost, "wrong_accepts": None, "ok": ok, "exit": rc,
            "killed_round": killed[1], "failed": failed, "participants": rec["participants"] if rec else None,
            "rounds": len(h), "left_after_run": left,
            "detail": (f"killed a job in round {killed[1]}: exit {rc}, {len(h)}/{ROUNDS} rounds, round {killed[1]} "
                       f"failed={failed}, {len(rec['participants']) if rec else 0} participants averaged; "
                       f"other rounds' failures: {others_failed or 'none'}")}


# ---------------------------------------------------------------------------------------------- 2. kill the server
def _reference_sim(ctx: Ctx, seed: int) -> Path:
    key = f"reference-sim-{seed}"
    if key not in ctx.cache:
        out = ctx.work / "kill_server" / f"reference-seed{seed}"
        out.parent.mkdir(parents=True, exist_ok=True)
        r = run_cli(sim_argv(ctx, out, seed=seed, epochs=2))
        if r.returncode != 0:
            raise RuntimeError(f"reference run failed ({r.returncode}): {r.stderr[-2000:]}")
        ctx.cache[key] = out
    return ctx.cache[key]


def _same_arrays(a: Path, b: Path) -> bool:
    import numpy as np

    from progfl.server.state import load_state

    x, y = load_state(a).arrays, load_state(b).arrays
    return x.keys() == y.keys() and all(np.array_equal(x[n], y[n]) for n in x)


def _kill_server(ctx: Ctx, out: Path, seed: int, target: int) -> dict[str, Any]:
    """Start `progfl simulate`, kill -9 it while a device job of round `target` runs; then check that every process
    of the run is gone within 10 s."""
    from loopback import _table, alive, start_time

    w = SimWatch(sim_argv(ctx, out, seed=seed, epochs=2), out, out.parent / f"{out.name}.log")
    info: dict[str, Any] = {"killed_round": None}
    found = w.wait_for_job(target)
    if found is None:
        w.p.wait(timeout=300)
        return info
    pid, t, rnd = found
    w.jobs()  # the whole tree, just before the kill
    done_before = rounds_done(out)
    tree = {p: s for p, s in w.seen.items() if p != w.p.pid and alive(p) and start_time(p) == s}
    os.kill(w.p.pid, signal.SIGKILL)
    t_kill = now()
    w.p.wait()

    def live() -> list[int]:
        """The run's processes still alive: those seen, and anything else in its session (a job forked after the
        last look; the simulate process was started in a session of its own)."""
        table = _table()
        for p, (_, sid, t) in table.items():
            if sid == w.p.pid and p not in tree:
                late.setdefault(p, t)
        return [p for p, s in {**tree, **late}.items() if alive(p) and start_time(p) == s]

    late: dict[int, int] = {}

    gone_after = None
    while now() - t_kill < 10.0:
        if not live():
            gone_after = now() - t_kill
            break
        time.sleep(0.05)
    left = live()
    names = {p: cmdline(p)[:80] for p in left}
    kill_tree(left, {**tree, **late})
    info.update(killed_round=rnd, rounds_done_at_kill=done_before, tree=len(tree), all_gone_s=gone_after,
                session_members_not_seen_before=len(late),
                left_10s=names, kinds=sorted(w.names.get(p, "device job") for p in tree))
    return info


def fault_kill_server(ctx: Ctx, trial: int) -> dict[str, Any]:
    from progfl.server.state import load_state
    import numpy as np

    seed = 7
    ref = _reference_sim(ctx, seed)
    out = ctx.work / "kill_server" / f"t{trial}"
    target = 2 + trial % (ROUNDS - 1)  # rounds 2.. (round 1 has no checkpoint yet: see kill-server-round1)
    info = _kill_server(ctx, out, seed, target)
    if info["killed_round"] is None:
        return {"detected": False, "rounds_lost": None, "wrong_accepts": None, "ok": False,
                "detail": "the run ended before a job of the target round was seen"}
    ck = checkpoint_round(out)
    r = run_cli(sim_argv(ctx, out, seed=seed, epochs=2, resume=True))
    lost = info["rounds_done_at_kill"] - (ck or 0)
    equal, maxdiff, same_choice = False, None, False
    if r.returncode == 0:
        a, b = load_state(ref), load_state(out)
        equal = a.round == b.round == ROUNDS and set(a.arrays) == set(b.arrays) and all(
            a.arrays[n].dtype == b.arrays[n].dtype and np.array_equal(a.arrays[n], b.arrays[n]) for n in a.arrays)
        maxdiff = max(float(np.max(np.abs(a.arrays[n].astype(np.float64) - b.arrays[n]))) for n in a.arrays)
        same_choice = [x["participants"] for x in history(ref)] == [x["participants"] for x in history(out)]
    clean = not info["left_10s"]
    return {"detected": True, "rounds_lost": lost, "wrong_accepts": None, "ok": r.returncode == 0 and equal and clean,
            **info, "checkpoint_round": ck, "resume_exit": r.returncode, "resume_stderr": one_line(r.stderr[-500:]),
            "equal_to_uninterrupted": equal, "max_abs_diff": maxdiff, "same_participants": same_choice,
            "detail": (f"killed in round {info['killed_round']} ({info['rounds_done_at_kill']} written, checkpoint "
                       f"round {ck}); the {info['tree']} processes of the run alive at the kill ("
                       f"{', '.join(f'{n} {k}' for k, n in sorted(Counter(info['kinds']).items()))}) all gone after "
                       f"{info['all_gone_s']:.2f} s" if clean else f"left after 10 s: {info['left_10s']}") +
                      f"; --resume exit {r.returncode}, final arrays equal to the uninterrupted run's: {equal} "
                      f"(max |diff| {maxdiff}), same participants: {same_choice}"}


def fault_kill_server_round1(ctx: Ctx, trial: int) -> dict[str, Any]:
    """kill -9 in round 1, before any checkpoint exists: what can the user do with the run folder?"""
    out = ctx.work / "kill_server_r1" / f"t{trial}"
    out.parent.mkdir(parents=True, exist_ok=True)
    info = _kill_server(ctx, out, seed=11 + trial, target=1)
    if info["killed_round"] != 1:
        return {"detected": False, "rounds_lost": None, "wrong_accepts": None, "ok": False,
                "detail": f"could not kill in round 1 (killed in {info['killed_round']})"}
    contents = sorted(p.name for p in out.iterdir())
    resumed = run_cli(sim_argv(ctx, out, seed=11 + trial, epochs=2, resume=True))
    clean = not info["left_10s"]
    done = rounds_done(out) if resumed.returncode == 0 else 0
    ok = resumed.returncode == 0 and done == ROUNDS and clean
    return {"detected": resumed.returncode == 0, "rounds_lost": 0 if ok else None, "wrong_accepts": None, "ok": ok,
            **info, "folder": contents, "resume_exit": resumed.returncode, "resume_rounds": done,
            "resume_stderr": one_line(resumed.stderr),
            "detail": (f"killed in round 1; folder left: {contents}; processes all gone after "
                       f"{info['all_gone_s']:.2f} s" if clean else f"left after 10 s: {info['left_10s']}") +
                      f"; --resume: exit {resumed.returncode}, the run (its run.json and data) started again and "
                      f"wrote {done}/{ROUNDS} rounds"}


# ---------------------------------------------------------------------------------------------- 3. poisoned updates
POISONS = {
    "nan": "NaN (one element)",
    "inf": "+Inf (one element)",
    "f64-1e300": "1e300 in a float64 array",
    "shape": "wrong shape (one array flattened)",
    "scale": "weights x 1e6",
    "negate": "weights sign-flipped (w -> -w)",
    "samples": "num_samples 10^12",
    "flip": "update direction flipped (g - delta)",
    "boost": "boosted flip (g - 10 delta)",
}


def poison(kind: str, u, g: dict[str, Any]):
    import numpy as np

    w = {n: np.array(a, copy=True) for n, a in u.weights.items()}
    name = max(w, key=lambda n: w[n].size)  # the largest array
    n_samples = u.num_samples
    if kind == "nan":
        w[name].flat[0] = np.nan
    elif kind == "inf":
        w[name].flat[0] = np.inf
    elif kind == "f64-1e300":
        w[name] = w[name].astype(np.float64)
        w[name].flat[0] = 1e300
    elif kind == "shape":
        w[name] = w[name].reshape(-1)
    elif kind == "scale":
        w = {n: (a * 1e6).astype(a.dtype) for n, a in w.items()}
    elif kind == "negate":
        w = {n: -a for n, a in w.items()}
    elif kind == "samples":
        n_samples = 10 ** 12
    elif kind == "flip":
        w = {n: (2.0 * g[n].astype(np.float64) - a).astype(a.dtype) for n, a in w.items()}
    elif kind == "boost":
        w = {n: (g[n].astype(np.float64) - 10.0 * (a.astype(np.float64) - g[n])).astype(a.dtype)
             for n, a in w.items()}
    else:
        raise ValueError(kind)
    return dataclasses.replace(u, weights=w, num_samples=n_samples)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _weighted(results, names, cap: bool):
    import numpy as np

    sums = {n: 0.0 for n in names}
    total = 0
    for d, u in results:
        w = min(int(u.num_samples), int(d.num_samples)) if cap else int(u.num_samples)
        for n in names:
            sums[n] = sums[n] + w * np.asarray(u.weights[n]).astype(np.float32).astype(np.float64)
        total += w
    return {n: (s / total).astype(np.float32) for n, s in sums.items()}


def engine_run(ctx: Ctx, out: Path, seed: int, kind: str | None) -> dict[str, Any]:
    """A benchmark-level round loop over RoundEngine (plan fedavg: the whole model every round): honest devices on
    DevicePool, then one device's update replaced by a poisoned copy before engine.aggregate."""
    import numpy as np

    from progfl.server.evaluate import Evaluator
    from progfl.server.rounds import RoundEngine
    from progfl.server.simulation import _train_device, prepare_data
    from progfl.server.workers import DevicePool, JobFailed

    cfg = sim_config(ctx, out, seed, plan="fedavg")
    engine = RoundEngine(cfg, quiet=True)
    devices, tx, ty = prepare_data(cfg, engine.manifest, engine.run)
    engine.evaluator = Evaluator(cfg.artifacts, engine.manifest, tx, ty)
    pool = ctx.cache.setdefault("pool", DevicePool(2, preload=["progfl.server.simulation"]))
    cap = _Capture()
    log = logging.getLogger("progfl.server")
    log.addHandler(cap)
    rounds = []
    try:
        while not engine.done:
            rnd = engine.configure(devices)
            outcomes = pool.map(_train_device, [
                (cfg.artifacts, str(engine.run / "data" / f"device_{d.id:04d}.npz"),
                 str(engine.run / "cache" / f"device_{d.id:04d}"), task) for d, task in rnd.tasks])
            results = [(d, u) for (d, _), u in zip(rnd.tasks, outcomes) if not isinstance(u, JobFailed)]
            failed = [(d.id, u.reason) for (d, _), u in zip(rnd.tasks, outcomes) if isinstance(u, JobFailed)]
            info: dict[str, Any] = {"round": rnd.number, "failed": failed}
            names = list(results[0][1].weights) if results else []
            if kind is not None and results:
                i = int(np.random.default_rng([seed, rnd.number]).integers(len(results)))
                d, u = results[i]
                g = {n: engine.state.arrays[n] for n in u.weights}
                results[i] = (d, poison(kind, u, g))
                info["poisoned"] = d.id
                info["claimed"] = results[i][1].num_samples
                info["registered"] = d.num_samples
            if kind is not None and results:  # the distance rule's view: each update's L2 move from the global
                dist = {}
                for d, u in results:
                    try:
                        with np.errstate(all="ignore"):
                            dist[d.id] = float(np.sqrt(sum(float(np.sum((np.asarray(u.weights[n]).astype(np.float32)
                                                                         .astype(np.float64) - engine.state.arrays[n]
                                                                         .astype(np.float64)) ** 2)) for n in names)))
                    except (KeyError, ValueError):
                        dist[d.id] = float("nan")
                finite = [v for v in dist.values() if np.isfinite(v)]
                info["moved"] = dist[info["poisoned"]]
                info["median"] = float(np.median(finite)) if finite else None
            n_log = len(cap.lines)
            record = engine.aggregate(rnd, results, failed)
            dropped = {who: why for who, why in record["dropped"]}
            info["dropped"] = record["dropped"]
            if kind is not None and results:
                info["accepted"] = info["poisoned"] not in dropped
                if kind == "samples":
                    honest = [(d, u) for d, u in sorted(results, key=lambda r: r[0].id) if d.id not in dropped]
                    capped, uncapped = _weighted(honest, names, True), _weighted(honest, names, False)
                    g = engine.state.arrays
                    info["capped_equal"] = all(np.array_equal(g[n], capped[n]) for n in names)
                    info["diff_capped"] = max(float(np.max(np.abs(g[n] - capped[n]))) for n in names)
                    info["diff_uncapped"] = max(float(np.max(np.abs(g[n] - uncapped[n]))) for n in names)
            info["log"] = cap.lines[n_log:]
            engine.commit(record)
            info["accuracy"] = record["accuracy"]
            rounds.append(info)
    finally:
        log.removeHandler(cap)
    return {"rounds": rounds, "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
            "arrays": {n: np.array(a) for n, a in engine.state.arrays.items()}}


def _reason(why: str) -> str:
    """A drop reason without its numbers (the distance rule's are per round)."""
    if why.startswith("moved "):
        return "farther from the global weights than 10 x the round's median distance"
    return why


def _moved(why: str) -> tuple[float, float] | None:
    """(distance moved, the round's median) from a distance-rule reason."""
    if not why.startswith("moved "):
        return None
    words = why.split()
    return float(words[1]), float(words[-1])


def fault_poison(kind: str) -> Callable[[Ctx, int], dict[str, Any]]:
    def run(ctx: Ctx, trial: int) -> dict[str, Any]:
        import numpy as np

        seed = 20 + trial
        key = f"honest-{seed}"
        if key not in ctx.cache:
            ctx.cache[key] = engine_run(ctx, ctx.work / "poison" / f"honest-s{seed}", seed, None)
        honest = ctx.cache[key]
        res = engine_run(ctx, ctx.work / "poison" / f"{kind}-t{trial}", seed, kind)
        rs = [r for r in res["rounds"] if "poisoned" in r]
        accepted = sum(r["accepted"] for r in rs)
        dropped = [r for r in rs if not r["accepted"]]
        reasons = sorted({_reason(next(why for who, why in r["dropped"] if who == r["poisoned"])) for r in dropped})
        moved = [_moved(next(why for who, why in r["dropped"] if who == r["poisoned"])) for r in dropped]
        moved = [m for m in moved if m]
        acc, acc0 = res["final_accuracy"], honest["final_accuracy"]
        out = {"poisoned_rounds": len(rs), "accepted": accepted, "final_accuracy": acc, "moved": moved,
               "honest_final_accuracy": acc0, "rounds": [{k: v for k, v in r.items() if k != "log"} for r in rs],
               "reasons": reasons}
        if kind == "samples":
            capped = all(r["accepted"] and r["capped_equal"] for r in rs)
            warned = all(any("claimed 1000000000000 samples" in line for line in r["log"]) for r in rs)
            same = all(np.array_equal(res["arrays"][n], honest["arrays"][n]) for n in honest["arrays"])
            out.update(detected=capped and warned, rounds_lost=0, wrong_accepts=0 if capped else accepted,
                       capped=capped, warned=warned, equal_to_honest=same, ok=capped,
                       detail=(f"{len(rs)} claims of 10^12 samples; global == honest-only capped average "
                               f"{'every round' if capped else 'NOT every round'} (max |global - capped| "
                               f"{max(r['diff_capped'] for r in rs):.3g}, max |global - uncapped| "
                               f"{max(r['diff_uncapped'] for r in rs):.3g}); logged 'claimed ... weighted by': "
                               f"{warned}; final weights == honest run's: {same}; accuracy {acc:.3f} vs {acc0:.3f}"))
        else:
            out.update(detected=accepted == 0, rounds_lost=0, wrong_accepts=accepted, ok=accepted == 0,
                       detail=(f"{len(rs) - accepted}/{len(rs)} dropped ({'; '.join(reasons) or '-'}); final "
                               f"accuracy {acc:.3f} vs {acc0:.3f} honest"))
        return out

    return run


# ---------------------------------------------------------------------------------------------- 4. corrupt artifacts
def fault_artifact_before(ctx: Ctx, trial: int) -> dict[str, Any]:
    from progfl.manifest import Manifest

    m = Manifest.load(ctx.art)
    stage = m.stages[trial % len(m.stages)]
    art = ctx.work / "artifact_before" / f"t{trial}" / "artifacts"
    shutil.copytree(ctx.art, art)
    rel = stage.files["training"].path
    offset = flip_byte(art / rel)
    out = art.parent / "run"
    r = run_cli(sim_argv(ctx, out, seed=trial, art=art))
    lines = r.stderr.strip().splitlines()
    named = len(lines) == 1 and "sha256" in lines[0] and rel.split("/")[-1] in lines[0]
    ok = r.returncode == 2 and named and not out.exists()
    return {"detected": r.returncode == 2 and named, "rounds_lost": 0, "wrong_accepts": None, "ok": ok,
            "file": rel, "offset": offset, "exit": r.returncode, "stderr": lines, "run_folder_written": out.exists(),
            "detail": f"byte {offset} of {rel}: exit {r.returncode}, `{one_line(r.stderr, 200)}`, run folder "
                      f"written: {out.exists()}"}


def fault_artifact_cache(ctx: Ctx, trial: int) -> dict[str, Any]:
    """Flower's simulation engine (run_flower_simulation, Ray): the virtual nodes share an artifact cache at
    run/flower/artifacts/<manifest sha>/. Right after round k's commit, one byte of the full stage's training file
    there is flipped (a RoundEngine subclass does it, synchronously, before round k+1 asks the nodes what they
    hold). Plan fedavg trains the full stage every round, so round k+1 needs that very file."""
    import progfl.server.flower as flower_mod
    import progfl.server.flower_sim as fs
    from progfl.manifest import MANIFEST_NAME, Manifest, sha256_file

    after = 1 + trial % (ROUNDS - 1)
    out = ctx.work / "artifact_cache" / f"t{trial}"
    m = Manifest.load(ctx.art)
    ref = m.stage("full").files["training"]
    sha = sha256_file(ctx.art / MANIFEST_NAME)
    target = out / "flower" / "artifacts" / sha / ref.path
    flipped: dict[str, Any] = {}
    sent: dict[int, int] = {}

    class CorruptingEngine(fs.RoundEngine):
        def commit(self, record):
            super().commit(record)
            if self.state.round == after:
                flipped["offset"] = flip_byte(target)
                flipped["sha_ok_after_flip"] = sha256_file(target) == ref.sha256

    original_configure = flower_mod.ProgflStrategy.configure_train

    def counting(self, server_round, arrays, config, grid):
        msgs = list(original_configure(self, server_round, arrays, config, grid))
        sent[self.engine.state.round + 1] = sum(1 for msg in msgs if "files" in msg.content)
        return msgs

    original_engine = fs.RoundEngine
    fs.RoundEngine, flower_mod.ProgflStrategy.configure_train = CorruptingEngine, counting
    error = None
    try:
        fs.run_flower_simulation(sim_config(ctx, out, 30 + trial, plan="fedavg"), quiet=True)
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    finally:
        fs.RoundEngine, flower_mod.ProgflStrategy.configure_train = original_engine, original_configure
    h = history(out)
    restored = target.exists() and sha256_file(target) == ref.sha256
    failed = {r["round"]: r["failed"] for r in h if r["failed"]}
    resent = sent.get(after + 1, 0)
    lost = (ROUNDS - len(h)) + sum(1 for r in h if r["kept_previous"])
    ok = error is None and len(h) == ROUNDS and not failed and resent > 0 and restored
    return {"detected": resent > 0 or bool(failed), "rounds_lost": lost, "wrong_accepts": None, "ok": ok,
            "after_round": after, "files_sent_per_round": sent, "failed": failed, "restored": restored,
            "error": error, "flipped": flipped,
            "detail": (f"flipped byte {flipped.get('offset')} of the cached {ref.path} after round {after}; messages "
                       f"carrying the stage's files per round: {dict(sorted(sent.items()))}; failures: "
                       f"{failed or 'none'}; cached file intact again at the end: {restored}; "
                       f"{len(h)}/{ROUNDS} rounds" + (f"; error {error}" if error else ""))}


# ---------------------------------------------------------------------------------------------- 5. corrupt checkpoint
def fault_checkpoint(which: str) -> Callable[[Ctx, int], dict[str, Any]]:
    def run(ctx: Ctx, trial: int) -> dict[str, Any]:
        from progfl.server.rounds import Stopped
        from progfl.server.simulation import run_simulation

        k = 1 + trial % (ROUNDS - 1)
        seed = 40 + trial
        base = ctx.work / f"checkpoint_{which}" / f"t{trial}"
        out = base / "run"
        try:
            run_simulation(sim_config(ctx, out, seed), quiet=True, stop_after=k)
        except Stopped:
            pass
        old_exists = (out / "checkpoint.old").exists()
        if which == "npz":
            what = f"flipped byte {flip_byte(out / 'checkpoint' / 'arrays.npz')} of checkpoint/arrays.npz"
        else:
            p = out / "checkpoint" / "state.json"
            size = p.stat().st_size
            p.write_bytes(p.read_bytes()[: size // 2])
            what = f"truncated checkpoint/state.json from {size} to {size // 2} bytes"
        r = run_cli(sim_argv(ctx, out, seed=seed, resume=True))
        lines = r.stderr.strip().splitlines()
        named = any("corrupt checkpoint" in line or "sha256" in line for line in lines)
        done = rounds_done(out) if r.returncode == 0 else 0
        # the resume must end where an untouched run ends: the damaged round (or, at round 1, the run) is redone
        reference = base / "untouched"
        ref = run_cli(sim_argv(ctx, reference, seed=seed))
        same = r.returncode == 0 and ref.returncode == 0 and _same_arrays(out, reference)
        redone = k - (k - 1 if old_exists else 0)
        return {"detected": named, "rounds_lost": 0 if same else k, "wrong_accepts": None,
                "ok": named and same and done == ROUNDS, "after_round": k, "exit": r.returncode,
                "stderr": [x for x in lines if "corrupt" in x or "sha256" in x][:2], "checkpoint_old": old_exists, "rounds_redone": redone,
                "detail": (f"after round {k}: {what}; --resume exit {r.returncode}, warned "
                           f"`{one_line(next((x for x in lines if 'corrupt' in x or 'sha256' in x), ''), 200)}`; "
                           f"fell back to {'checkpoint.old (round ' + str(k - 1) + ')' if old_exists else 'round 0'}, "
                           f"redid {redone} round(s), {done}/{ROUNDS} rounds; final arrays equal to an untouched "
                           f"run's: {same}")}

    return run


# ---------------------------------------------------------------------------------------------- 6/7. SuperNodes
def _deploy_data(ctx: Ctx) -> Path:
    if "deploy-data" not in ctx.cache:
        import numpy as np

        from progfl.data import iid, load_dataset, write_dataset, write_shards

        folder = ctx.work / "deploy-data"
        train, test = load_dataset("digits", seed=0)
        write_shards(train, iid(train.y, 3, np.random.default_rng(0)), folder / "data")
        write_shards(test, iid(test.y, 3, np.random.default_rng(1)), folder / "eval")
        write_dataset(test, folder / "test.npz")
        ctx.cache["deploy-data"] = folder
    return ctx.cache["deploy-data"]


def _tree(pid: int) -> list[int]:
    """pid's descendants through /proc/PID/task/TID/children (a few small reads, not a walk of all of /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                kids = [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def _session_train_jobs(sid: int) -> list[tuple[int, int]]:
    """(pid, round) of the device training jobs running under a SuperNode (its ClientApp starts each as
    `python -m progfl.device_runtime.job FOLDER`, FOLDER/job.json saying what it runs; evaluations are skipped)."""
    out = []
    for p in _tree(sid):
        line = cmdline(p).split()
        if "progfl.device_runtime.job" not in line:
            continue
        try:
            job = json.loads((Path(line[-1]) / "job.json").read_text())
        except (OSError, ValueError, IndexError):
            continue
        if job.get("kind") == "train":
            out.append((p, int(job["task"]["round"])))
    return sorted(out)


def fault_supernode(mode: str, round_timeout: float = ROUND_TIMEOUT) -> Callable[[Ctx, int], dict[str, Any]]:
    """mode: kill (kill -9 the SuperNode mid-round), stop (SIGSTOP for STOP_SECONDS > round timeout, then SIGCONT),
    restart (kill -9 mid-round, then start a new SuperNode with the same node config at once)."""

    def run(ctx: Ctx, trial: int) -> dict[str, Any]:
        from loopback import Deployment

        data = _deploy_data(ctx)
        root = ctx.work / f"supernode_{mode}_{round_timeout:.0f}" / f"t{trial}"
        out = root / "run"
        rounds = ROUNDS + (1 if mode != "kill" else 0)  # stop/restart: one more round to see the node come back
        victim = trial % 3
        node_cfg = {i: (f'memory-mb=1024 data-path="{data / "data" / f"device_{i:04d}.npz"}" '
                        f'eval-data-path="{data / "eval" / f"device_{i:04d}.npz"}" '
                        f'artifacts-dir="{root / f"cache{i}"}" backend="ort" threads=1 device-id={i}')
                    for i in range(3)}
        run_cfg = (f'artifacts="{ctx.art}" out="{out}" test-data="{data / "test.npz"}" plan="profl" '
                   f'rounds={rounds} per-round=3 seed={50 + trial} lr={LR} epochs=1 min-nodes=3 '
                   f'query-timeout={QUERY_TIMEOUT} round-timeout={round_timeout} pace=\'{json.dumps(PACE)}\'')
        t0 = now()
        events: list[str] = []
        status, run_id, inject_round, node_pid = "", None, None, None
        stopped_at = resumed_at = None
        run_log, orphans = "", []
        with Deployment(root / "deploy", tls=False) as d:
            try:
                d.start_superlink()
                for i in range(3):
                    d.start_supernode(f"node{i}", node_cfg[i])
                for p in d.procs:
                    TRACK.sessions.add(p.pid)
                deadline = time.time() + 90
                while sum(n["status"] == "online" for n in d.supernodes()) < 3:
                    if time.time() > deadline:
                        raise RuntimeError("3 SuperNodes not online within 90 s")
                    time.sleep(1)
                run_id = d.run(APP, run_cfg)
                events.append(f"{now() - t0:.0f}s run {run_id} started")
                node = d.nodes[f"node{victim}"]
                node_pid = node.pid
                polled: dict[str, str] = {}
                poller = threading.Thread(target=lambda: None)
                poller.start()
                last_status, last_track, deadline = 0.0, 0.0, time.time() + 600
                while time.time() < deadline:
                    if time.time() - last_track > 1.0:
                        d.track()
                        last_track = time.time()
                    if inject_round is None and rounds_done(out) >= 1:
                        jobs = [(j, r) for j, r in _session_train_jobs(node.pid) if r >= 2]
                        if jobs:
                            inject_round = jobs[0][1]
                            if mode == "stop":
                                os.kill(node.pid, signal.SIGSTOP)
                                stopped_at = now()
                                events.append(f"{now() - t0:.0f}s SIGSTOP node{victim} (pid {node.pid}) while its "
                                              f"job {jobs[0][0]} trains round {inject_round}")
                            else:
                                d.track()
                                os.kill(node.pid, signal.SIGKILL)
                                events.append(f"{now() - t0:.0f}s kill -9 node{victim} (pid {node.pid}) while its "
                                              f"job {jobs[0][0]} trains round {inject_round}")
                                if mode == "restart":
                                    node.wait()
                                    d.start_supernode(f"node{victim}-restarted", node_cfg[victim])
                                    TRACK.sessions.add(d.nodes[f"node{victim}-restarted"].pid)
                                    events.append(f"{now() - t0:.0f}s restarted node{victim} (same node config)")
                    if stopped_at is not None and resumed_at is None and now() - stopped_at >= STOP_SECONDS:
                        os.kill(node.pid, signal.SIGCONT)
                        resumed_at = now()
                        events.append(f"{now() - t0:.0f}s SIGCONT node{victim} after {resumed_at - stopped_at:.0f} s "
                                      f"(rounds written: {rounds_done(out)})")
                    if time.time() - last_status > 5.0 and not poller.is_alive():
                        # `flwr ls` takes seconds: in a thread, so that /proc is watched all the while
                        status = polled.get("status", "")
                        if status.startswith("finished") and (resumed_at is not None or stopped_at is None):
                            break
                        poller = threading.Thread(target=lambda: polled.update(status=d.status(run_id)), daemon=True)
                        poller.start()
                        last_status = time.time()
                    time.sleep(0.02)
                poller.join(timeout=120)
                events.append(f"{now() - t0:.0f}s run status {status!r}")
                orphans = []
                if mode != "stop":  # what of the killed SuperNode's session still runs when the run is over
                    from loopback import _table

                    orphans = [f"{p}: {cmdline(p)[:60]}" for p, (_, s, _) in _table().items() if s == node_pid]
                run_log = d.run_log(run_id) if run_id is not None else ""
            finally:
                if stopped_at is not None and resumed_at is None:
                    try:
                        os.kill(node_pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                d.track()
                for pid in d.seen:
                    TRACK.add(pid, d.seen[pid])
        left = d.left
        (root / "serverapp.log").write_text(run_log)
        h = history(out)
        rec = next((r for r in h if r["round"] == inject_round), None)
        later = [r for r in h if inject_round is not None and r["round"] > inject_round]
        failed = rec["failed"] if rec else []
        victim_failed = [f for f in failed if f[0] == victim]
        lost = (rounds - len(h)) + sum(1 for r in h if r["kept_previous"])
        back = [r["round"] for r in later if victim in r["participants"]]
        later_desc = "; ".join(f"round {r['round']}: participants {r['participants']}, failed {r['failed'] or '-'}, "
                               f"{r['wall_seconds']:.0f} s" for r in later)
        warn = sorted({one_line(line, 160) for line in run_log.splitlines()
                       if "did not answer" in line or "both claim" in line or "failed round" in line
                       or "could not evaluate" in line})
        if mode == "kill":
            ok = status == "finished:completed" and len(h) == rounds and bool(victim_failed) and not back
        else:
            ok = status == "finished:completed" and len(h) == rounds and bool(victim_failed)
        return {"detected": bool(victim_failed), "rounds_lost": lost, "wrong_accepts": None, "ok": ok and not left,
                "status": status, "victim_device": victim, "inject_round": inject_round, "failed": failed,
                "round_seconds": rec["wall_seconds"] if rec else None, "rejoined_in_rounds": back,
                "later": later_desc, "events": events, "left": left, "orphans_at_end": orphans,
                "server_warnings": warn, "rounds": len(h),
                "detail": (f"device {victim} hit in round {inject_round}: run {status!r}, {len(h)}/{rounds} rounds; "
                           f"round {inject_round} failed={failed} ({rec['wall_seconds']:.0f} s)"
                           if rec else f"device {victim}: run {status!r}, {len(h)}/{rounds} rounds, no record of "
                                       f"round {inject_round}") +
                          f"; later: {later_desc or '-'}" +
                          (f"; killed node's processes still running at the end: {len(orphans)}" if orphans else "")
                          + (f"; LEFT RUNNING: {left}" if left else "")}

    return run


# ---------------------------------------------------------------------------------------------- the table
FAULTS: list[tuple[str, str, Callable[[Ctx, int], dict[str, Any]]]] = [
    ("kill-device", "1. kill -9 of a device job mid-round (progfl simulate)", fault_kill_device),
    ("kill-server", "2. kill -9 of progfl simulate mid-round (round 2 or 3), then --resume", fault_kill_server),
    ("kill-server-round1", "2b. kill -9 of progfl simulate in round 1 (no checkpoint yet), then --resume",
     fault_kill_server_round1),
    *[(f"poison-{k}", f"3. poisoned update: {v}", fault_poison(k)) for k, v in POISONS.items()],
    ("artifact-before", "4a. one byte flipped in a stage's training ONNX before progfl simulate",
     fault_artifact_before),
    ("artifact-cache", "4b. one byte flipped in a Flower node's artifact cache between rounds (simulation engine)",
     fault_artifact_cache),
    ("checkpoint-npz", "5a. one byte flipped in checkpoint/arrays.npz, then --resume", fault_checkpoint("npz")),
    ("checkpoint-json", "5b. checkpoint/state.json truncated to half, then --resume", fault_checkpoint("json")),
    ("supernode-kill", "6. kill -9 of a SuperNode mid-round (loopback deployment)", fault_supernode("kill")),
    ("supernode-kill-long", "6b. the same with a 120 s round timeout (longer than Flower's heartbeat patience)",
     fault_supernode("kill", 120.0)),
    ("supernode-stop", f"7. SuperNode SIGSTOPped mid-round for {STOP_SECONDS:.0f} s (> round timeout), then SIGCONT",
     fault_supernode("stop")),
    ("supernode-restart", "7b. SuperNode killed mid-round and restarted at once (same node config)",
     fault_supernode("restart")),
]


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    def total(key):
        vals = [t.get(key) for t in trials]
        return None if all(v is None for v in vals) else sum(v or 0 for v in vals)

    return {"trials": len(trials), "detected": sum(bool(t.get("detected")) for t in trials),
            "rounds_lost": total("rounds_lost"), "wrong_accepts": total("wrong_accepts"),
            "as_expected": sum(bool(t.get("ok")) for t in trials)}


def how(key: str, trials: list[dict[str, Any]]) -> str:
    """The table's last column: what progfl did, in a few words, from the trials."""
    if any("exception" in t for t in trials):
        return "benchmark error: " + "; ".join(t["exception"] for t in trials if "exception" in t)
    ts = trials
    if not ts:
        return "-"
    first = ts[0]
    if key == "kill-device":
        reasons = sorted({f[1] for t in ts for f in t.get("failed", []) if "signal" in f[1]})
        return (f"killed device in that round's `failed` ({', '.join(reasons) or 'none'}); the round averaged the "
                f"other {', '.join(str(len(t['participants'])) for t in ts if t.get('participants') is not None)} "
                f"devices; {sum(t.get('rounds') == ROUNDS for t in ts)}/{len(ts)} runs completed all rounds")
    if key == "kill-server":
        gone = [t["all_gone_s"] for t in ts if t.get("all_gone_s") is not None]
        return (f"all run processes gone {min(gone):.1f}-{max(gone):.1f} s after the kill; --resume redid the "
                f"killed round from the checkpoint; final arrays equal to the uninterrupted run's: "
                f"{sum(bool(t.get('equal_to_uninterrupted')) for t in ts)}/{len(ts)}" if gone else
                "; ".join(t["detail"] for t in ts))
    if key == "kill-server-round1":
        return (f"--resume started the run again on its own data (run.json, data/): exit 0 in "
                f"{sum(t.get('resume_exit') == 0 for t in ts)}/{len(ts)} trials, all {ROUNDS} rounds written in "
                f"{sum(t.get('resume_rounds') == ROUNDS for t in ts)}/{len(ts)}")
    if key == "poison-samples":
        return ("accepted with weight capped to the registered count (global == honest-only capped average: "
                f"{sum(bool(t.get('capped')) for t in ts)}/{len(ts)} trials; the round records the capped weight and "
                "the claim as `claimed_samples`)")
    if key.startswith("poison-"):
        reasons = sorted({r for t in ts for r in t.get("reasons", [])})
        acc = ", ".join(f"{t['final_accuracy']:.3f}" for t in ts)
        acc0 = ", ".join(f"{t['honest_final_accuracy']:.3f}" for t in ts)
        n = sum(t["poisoned_rounds"] for t in ts)
        dropped = sum(t["poisoned_rounds"] - t["accepted"] for t in ts)
        text = f"{dropped}/{n} dropped" + (f": {'; '.join(reasons)}" if reasons else "")
        moved = [m for t in ts for m in t.get("moved", [])]
        if moved:
            text += (f" (moved {min(m[0] for m in moved):.3g}-{max(m[0] for m in moved):.3g}, medians "
                     f"{min(m[1] for m in moved):.3g}-{max(m[1] for m in moved):.3g})")
        kept = [(r["moved"], r["median"]) for t in ts for r in t.get("rounds", []) if r.get("accepted")]
        if kept:
            text += (f"; accepted ones moved {min(m for m, _ in kept):.3g}-{max(m for m, _ in kept):.3g} = "
                     f"{min(m / md for m, md in kept):.1f}-{max(m / md for m, md in kept):.1f} x the round's median "
                     f"(limit 10 x)")
        if dropped < n:
            text += f"; final accuracy {acc} vs honest {acc0}"
        return text
    if key == "artifact-before":
        return f"exit 2 before any work, no run folder: `{one_line(' '.join(first.get('stderr', [])), 150)}`"
    if key == "artifact-cache":
        return ("held_stages re-verified the cache: the node no longer listed the stage, the server re-sent its "
                f"files (messages with files in the round after the flip: "
                f"{', '.join(str(t['files_sent_per_round'].get(t['after_round'] + 1, 0)) for t in ts)}), file "
                f"restored: {sum(bool(t.get('restored')) for t in ts)}/{len(ts)}; failures: "
                f"{sum(bool(t.get('failed')) for t in ts)} trials")
    if key.startswith("checkpoint-"):
        old = sum(bool(t.get("checkpoint_old")) for t in ts)
        same = sum(t.get("rounds_lost") == 0 for t in ts)
        return (f"the sha256 / parse check refused it and --resume fell back to checkpoint.old (the previous round, "
                f"{old}/{len(ts)} trials) or, at round 1, to round 0 (warning: `"
                f"{one_line(next((x for t in ts for x in t.get('stderr', []) if 'corrupt' in x), ''), 110)}`), "
                f"redoing {', '.join(str(t.get('rounds_redone')) for t in ts)} round(s); final arrays equal to an "
                f"untouched run's: {same}/{len(ts)}")
    if key.startswith("supernode-"):
        reasons = sorted({f[1] for t in ts for f in t.get("failed", []) if f[0] == t.get("victim_device")})
        back = [bool(t.get("rejoined_in_rounds")) for t in ts]
        secs = [t["round_seconds"] for t in ts if t.get("round_seconds") is not None]
        text = (f"device in that round's `failed` ({'; '.join(reasons) or 'none'}); that round took "
                f"{min(secs):.0f}-{max(secs):.0f} s" if secs else "no record of the hit round")
        if key.startswith("supernode-kill"):
            text += f"; later rounds without it: {sum(not b for b in back)}/{len(ts)}"
        else:
            text += f"; the device trained again in a later round: {sum(back)}/{len(ts)}"
        return text
    return first.get("detail", "-")


NOTES = """## How each fault was injected

1. `progfl simulate` as a subprocess; /proc is polled (3 ms) for a child of the multiprocessing forkserver (itself a
   child of the simulate process) while round 1, 2 or 3 runs, and that device job gets SIGKILL.
2. The same, but the simulate process gets SIGKILL while a job of round 2 or 3 runs; every process of the run
   (those seen, plus anything in its session) must be gone within 10 s; then the same command with `--resume`,
   whose final checkpoint is compared array by array (np.array_equal, same dtype) with an uninterrupted run of the
   same command. 2b: the kill in round 1, before the first checkpoint.
3. A loop over RoundEngine in this process (configure -> DevicePool + simulation._train_device for the honest
   devices -> one TrainUpdate replaced by a poisoned copy -> engine.aggregate -> engine.commit), plan fedavg, 4
   devices a round, outlier-k 10 (the default). num_samples 10^12: the global arrays after the round are compared
   exactly with the sample-weighted average of the round's accepted updates with every claim capped to the
   device's registered count (and with the uncapped one).
4. a: a copy of the artifacts with one byte of a stage's training_model.onnx flipped, then `progfl simulate`. b:
   `run_flower_simulation` (Flower's simulation engine, Ray, 6 virtual nodes sharing the cache
   run/flower/artifacts/<manifest sha>/); a RoundEngine subclass flips one byte of the cached full-stage
   training_model.onnx right after round 1's or 2's commit, before the next round asks the nodes what they hold;
   ProgflStrategy.configure_train is wrapped to count the train messages that carry the stage's files.
5. `run_simulation(stop_after=k)` in this process (k = 1 or 2 of 3 rounds), the checkpoint damaged, then
   `progfl simulate ... --resume` as a subprocess, whose final arrays are compared with an untouched run's (same
   settings, its own folder).
6, 7. tests/loopback.Deployment (insecure): a SuperLink, 3 SuperNodes (node config memory-mb 1024, data-path,
   eval-data-path, artifacts-dir, backend ort, threads 1, device-id), `flwr run progfl/flower_app` with plan profl,
   per-round 3. Once round 1 is written and the victim's ClientApp runs a training job (`python -m
   progfl.device_runtime.job`, job.json kind train, round >= 2) the SuperNode process gets SIGKILL (6, 6b, 7b) or
   SIGSTOP for 45 s, then SIGCONT (7). 7b starts a new SuperNode with the same node config right after the kill.
   7 and 7b run 4 rounds, to see whether the device trains again.
"""


def render(results: dict[str, Any]) -> str:
    from _common import md_table

    rows, notes = [], []
    for key, title, _ in FAULTS:
        if key not in results["faults"]:
            continue
        f = results["faults"][key]
        s = f["summary"]
        lost = "-" if s["rounds_lost"] is None else s["rounds_lost"]
        wrong = "-" if s["wrong_accepts"] is None else s["wrong_accepts"]
        if key == "poison-samples" and s["wrong_accepts"] == 0:
            wrong = "0 (accepted with weight capped)"
        rows.append([title, s["trials"], s["detected"], lost, wrong, how(key, f["trials"])])
        notes.append(f"**{title}** ({s['as_expected']}/{s['trials']} trials as expected)\n")
        notes += [f"- trial {i}: {t.get('detail') or t.get('exception')}" for i, t in enumerate(f["trials"])]
        notes.append("")
    head = ["fault", "trials", "detected", "rounds lost", "wrong accepts", "how it was detected / what happened"]
    r = results
    text = [
        "# Fault injection\n",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}; wall time {r.get('wall_seconds', 0) / 60:.1f} min on {os.cpu_count()} shared cores"
        f"{' (unfinished)' if not r.get('finished') else ''}.\n",
        f"Setting: tiny CNN (width 4, 1x8x8, stages grow/distill/full, ONNX Runtime) on sklearn digits; "
        f"{DEVICES} devices, {PER_ROUND} a round, {ROUNDS} rounds, lr {LR}, 1 local epoch (2 for faults 1-2), "
        f"2 worker processes, plan ProFL (fedavg for 3 and 4b: the whole model every round). Loopback deployment "
        f"(6, 7): a SuperLink and 3 SuperNodes (1024 MB, device ids 0-2), per-round 3, round timeout "
        f"{ROUND_TIMEOUT:.0f} s, query timeout {QUERY_TIMEOUT:.0f} s, insecure. The trials differ by seed, the "
        f"round hit and the device hit.\n",
        "detected: trials in which progfl noticed the fault (for 3: every poisoned update of the trial dropped, "
        "or its claim capped). rounds lost: completed rounds whose work was lost, summed over trials (a round "
        "redone after a resume from the last checkpoint is not lost). wrong accepts: poisoned updates averaged "
        "into the global model, summed over trials (fault 3 poisons one of the 4 updates in each of the 3 rounds "
        "of a trial, a device drawn at random; 'final accuracy' is the server's test accuracy after round 3, "
        "against the same seed without poison).\n",
        md_table(head, rows),
        "## Per trial\n",
        *notes,
    ]
    text.append(NOTES)
    if r.get("processes_left") is not None:
        text.append(f"Processes started by the benchmark still alive at its end: {r['processes_left'] or 'none'}.\n")
    for extra in r.get("remarks", []):
        text.append(extra)
    return ("\n".join(text) + "\n").replace(r.get("work", "<work>"), "<work>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 trial per fault")
    ap.add_argument("--only", default="", help="comma-separated fault keys (default: all): "
                                               + ", ".join(k for k, _, _ in FAULTS))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    args = ap.parse_args()
    trials = 1 if args.quick else args.trials
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(only) - {k for k, _, _ in FAULTS}
    if unknown:
        ap.error(f"unknown fault keys: {sorted(unknown)}")
    from _common import write_json, write_text

    t_start = now()
    work = args.work or Path(tempfile.mkdtemp(prefix="faults."))
    work.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/faults.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results: dict[str, Any] = {"command": command.strip(), "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "trials": trials, "faults": {}, "finished": False, "work": str(work),
        "settings": {"devices": DEVICES, "per_round": PER_ROUND, "rounds": ROUNDS, "lr": LR, "pace": PACE,
                     "round_timeout": ROUND_TIMEOUT, "query_timeout": QUERY_TIMEOUT, "stop_seconds": STOP_SECONDS}}
    json_path, md_path = args.out / "faults.json", args.out / "faults.md"

    def save() -> None:
        results["wall_seconds"] = now() - t_start
        write_json(json_path, results)
        write_text(md_path, render(results))

    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        print(f"exporting the tiny CNN into {work} ...", flush=True)
        art, fleet = make_artifacts(work)
        fleet_file = work / "fleet.json"
        fleet_file.write_text(json.dumps(fleet))
        ctx = Ctx(work=work, art=art, fleet=fleet, fleet_file=fleet_file, trials=trials)
        for key, title, fn in FAULTS:
            if only and key not in only:
                continue
            entry = results["faults"].setdefault(key, {"title": title, "trials": [], "summary": {}})
            for trial in range(trials):
                t0 = now()
                print(f"[{now() - t_start:6.0f}s] {key} trial {trial} ...", flush=True)
                try:
                    res = fn(ctx, trial)
                except Exception as e:  # noqa: BLE001  (a broken cell is reported, the others still run)
                    traceback.print_exc()
                    res = {"exception": f"{type(e).__name__}: {one_line(str(e), 300)}", "detected": False, "ok": False}
                res["seconds"] = round(now() - t0, 1)
                entry["trials"].append(res)
                entry["summary"] = summarize(entry["trials"])
                print(f"    {res.get('detail') or res.get('exception')} ({res['seconds']} s)", flush=True)
                save()
        results["finished"] = True
    finally:
        pool = ctx.cache.pop("pool", None) if "ctx" in locals() else None
        del pool  # its forkserver exits with this process
        time.sleep(1.0)
        left = TRACK.live()
        results["processes_left"] = [f"{p}: {cmdline(p)[:100]}" for p in left]
        kill_tree(left, TRACK.seen)
        save()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(open(md_path).read())


if __name__ == "__main__":
    main()
