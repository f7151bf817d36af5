"""The round engine: one run's rounds, written once for every transport.

A transport (progfl simulate's local device processes in simulation.py, the Flower strategy in flower.py) only
moves tasks to devices and updates back. One round, in order:

    rnd = engine.configure(devices)            # the plan picks devices and writes their TrainTasks
    ...the transport runs rnd.tasks on the devices...
    record = engine.aggregate(rnd, results, failed, late)   # accepted updates folded into the global arrays;
                                                            # those over RunSettings.deadline dropped as late
    ...(Flower: the devices evaluate the new model on their held-out data and add it to the record)...
    engine.commit(record)                      # server-side evaluation, history.json, checkpoint; stops on divergence

The engine owns the settings, the plan, the server state and its random stream, so a run stopped after any
round (Ctrl-C, kill -9, divergence) resumes exactly, whatever the transport.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..device_runtime.memory import peak_mb, rss_mb
from ..manifest import Manifest, TrainTask, TrainUpdate, write_atomic
from .deadline import Late, check_deadline, split_late
from .divergence import check_divergence
from .evaluate import Evaluator
from .pace import PaceConfig
from .plans import Plan, PlanConfig, make_plan
from .selection import DeviceInfo
from .settings import given, parse_settings
from .state import ServerState, StateError, load_state, restore_rng, save_state

log = logging.getLogger("progfl.server")


@dataclass(kw_only=True)
class RunSettings:
    """What every run needs, whatever moves its messages (progfl simulate and the Flower app extend it)."""

    artifacts: str
    out: str
    plan: str = "profl"
    rounds: int = 30  # the round budget: a run trains exactly this many rounds unless it diverges
    per_round: int = 5
    epochs: int = 5  # local epochs, as ProFL's authors
    lr: float = 0.01  # SGD lr, as ProFL's authors (momentum 0.9, weight decay 5e-4 and batch 32 are set at export)
    seed: int = 0
    pace: dict[str, Any] = field(default_factory=dict)  # PaceConfig keys
    options: dict[str, Any] = field(default_factory=dict)  # the plan's Options keys
    outlier_k: float = 10.0  # drop an update farther than k x the round's median distance (0: never)
    max_rejected_rounds: int = 3  # stop (Diverged) after this many rounds in a row with no update accepted; 0: never
    target: float | None = None  # accuracy for rounds/time-to-target in the report
    deadline: float | None = None  # seconds of device time a round waits for an update; later ones are dropped

    def check(self) -> tuple[Manifest, Plan]:
        """Every setting and the artifacts, before any work; pace and options come back typed. Returns the
        manifest and the plan built from these settings."""
        if self.per_round < 1 or self.rounds < 1 or self.epochs < 1:
            raise ValueError("per-round, rounds and epochs must be >= 1")
        if not (np.isfinite(self.lr) and self.lr > 0) or self.max_rejected_rounds < 0 or not self.outlier_k >= 0:
            raise ValueError("lr must be > 0, max-rejected-rounds >= 0 and outlier-k >= 0")
        check_deadline(self.deadline)
        pace = parse_settings(PaceConfig, self.pace, "--pace")
        manifest = Manifest.load(self.artifacts)
        manifest.verify_files(self.artifacts)
        plan = make_plan(self.plan, manifest, PlanConfig(
            rounds=self.rounds, per_round=self.per_round, lr=self.lr, epochs=self.epochs, seed=self.seed, pace=pace,
            options=dict(self.options), outlier_k=self.outlier_k))
        self.pace, self.options = given(pace, self.pace), given(plan.options, self.options)
        return manifest, plan


@dataclass
class Round:
    """What one round sent, until its updates are folded in."""

    number: int
    stage: str
    eligible: int
    tasks: list[tuple[DeviceInfo, TrainTask]]
    started: float
    # the server's own work on this round so far (configure; a transport adds its part, e.g. writing shards), so
    # the record's `server_seconds` tells what the server costs apart from waiting for devices
    server_seconds: float = 0.0


RUN_MARKER = "run.json"  # a run folder's settings, written before anything else


def check_new_run_folder(run: Path) -> None:
    """A new run starts in a missing or empty folder, never over another run (progfl compare checks every plan's
    folder with this before the first one runs)."""
    if run.exists() and any(run.iterdir()):
        raise ValueError(f"{run}: run folder exists and is not empty (use --resume to continue a run)")


class Stopped(Exception):
    """The run was stopped on purpose after a round (tests; a user presses Ctrl-C instead)."""


class RoundEngine:
    """One run: its folder, settings, plan and state; the transport calls configure, aggregate, commit."""

    def __init__(self, settings: RunSettings, resume: bool = False, extra_config: dict[str, Any] | None = None,
                 quiet: bool = False, stop_after: int | None = None):
        """Checks the settings, the artifacts and the run folder, then makes the folder. The checkpoint records the
        settings (plus `extra_config`, e.g. the transport); a resume must present the same."""
        self.settings, self.quiet, self.stop_after = settings, quiet, stop_after
        self.manifest, self.plan = settings.check()
        self.run = Path(settings.out)
        self.config = json.loads(json.dumps({**asdict(settings), **(extra_config or {})}))  # as read back
        has_checkpoint = self.run.is_dir() and any((self.run / c / "state.json").exists()
                                                   for c in ("checkpoint", "checkpoint.old"))
        self._restarted = resume and not has_checkpoint
        if self._restarted:
            self._check_marker()  # stopped before its first checkpoint: it starts again, on the data it prepared
            resume = False
        elif not resume:
            check_new_run_folder(self.run)
        self.resume, self._created = resume, not self.run.exists()
        self.run.mkdir(parents=True, exist_ok=True)
        if not (self.run / RUN_MARKER).exists():
            write_atomic(self.run / RUN_MARKER, json.dumps(self.config, indent=1).encode())
        self.evaluator: Evaluator | None = None
        # every device seen: id -> (budget_mb, baseline_mb). A fleet of 10,000 is 10,000 of these, so the engine keeps
        # tuples and history.json's "fleet" text is encoded again only when the fleet changed (_fleet_json None)
        self.fleet: dict[int, tuple[float, float]] = {}
        self._fleet_json: str | None = None
        self.state = self._open_state()

    def _check_marker(self) -> None:
        """A resume without a checkpoint continues only a run of these settings that this engine started (its
        run.json), never a foreign folder."""
        try:
            marked = json.loads((self.run / RUN_MARKER).read_text())
        except (OSError, ValueError):
            raise StateError(f"{self.run}: no checkpoint to resume from (run without --resume to start it)") from None
        if marked != self.config:
            raise StateError(f"{self.run}: the run was started with other settings; resume with the same ones")

    def _open_state(self) -> ServerState:
        if self.resume:
            try:
                state = load_state(self.run)
            except StateError as e:  # damaged, and no earlier round's checkpoint to fall back to: start again
                if (self.run / "checkpoint.old").exists():
                    raise
                self._check_marker()
                log.warning("%s; the run had no earlier checkpoint: it starts again from round 0", e)
                return self._new_state()
            if state.config != self.config:
                changed = sorted(k for k in set(state.config) | set(self.config)
                                 if state.config.get(k) != self.config.get(k))
                raise StateError(f"{self.run}: the checkpoint was made with other settings ({', '.join(changed)}); "
                                 f"resume with the same ones")
            self.plan.restore(state)
            try:
                self.fleet = {d["id"]: (d["budget_mb"], d["baseline_mb"])
                              for d in json.loads((self.run / "history.json").read_text())["fleet"]}
            except (OSError, ValueError, KeyError, TypeError):
                pass  # history.json is rewritten after the next round; the fleet is seen again then
            return state
        return self._new_state()

    def _new_state(self) -> ServerState:
        state = ServerState(round=0, plan=self.plan.name, plan_state={},
                            arrays=self.manifest.initial_weights(self.settings.artifacts), pace={},
                            rng=np.random.default_rng([self.settings.seed, 2]).bit_generator.state, config=self.config)
        self.plan.start(state)
        return state

    def abandon(self) -> None:
        """Undo a new run's folder when its set-up fails before the first round: nothing half-written is left."""
        if self.resume or self._restarted or self.state.history:
            return
        if self._created:
            shutil.rmtree(self.run, ignore_errors=True)
        else:  # the user's own empty folder: empty it again
            for p in self.run.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    @property
    def done(self) -> bool:
        return self.plan.done(self.state)

    def configure(self, devices: list[DeviceInfo]) -> Round:
        """This round's (device, task) pairs, chosen by the plan among the devices known now (in id order: on Flower
        the nodes answer in any order, and the choice must not depend on it)."""
        started = time.perf_counter()
        devices = sorted(devices, key=lambda d: d.id)
        for d in devices:
            seen = (d.budget_mb, d.baseline_mb)
            if self.fleet.get(d.id) != seen:
                self.fleet[d.id], self._fleet_json = seen, None
        rng = restore_rng(self.state.rng)
        eligible = len(self.plan.candidates(devices, self.state))
        tasks = self.plan.configure_train(self.state, devices, rng)
        self.state.rng = rng.bit_generator.state
        return Round(self.state.round + 1, self.plan.stage(self.state).name, eligible, tasks, started,
                     time.perf_counter() - started)

    def aggregate(self, rnd: Round, results: list[tuple[DeviceInfo, TrainUpdate]],
                  failed: list[tuple[int, str]], late: list[Late] | None = None) -> dict[str, Any]:
        """Fold the round's updates into the global arrays; the record of the round (not yet written). Under a
        deadline, a result whose device time (metrics `seconds`) is over it joins `late` (devices the transport
        stopped waiting for): none of them is aggregated, each is logged and listed in the record."""
        began = time.perf_counter()
        results = sorted(results, key=lambda r: r[0].id)  # records must not depend on the order replies arrived in
        failed = sorted(failed)
        late = list(late or [])
        deadline = self.settings.deadline
        if deadline is not None:
            results, over = split_late(results, deadline)
            late = sorted(late + over, key=lambda x: x.id)
        for device, reason in failed:
            log.warning("device %s failed round %d (stage %s): %s", device, rnd.number, rnd.stage, reason)
        for x in late:
            log.warning("device %s missed the %g s deadline of round %d (stage %s): %.1f s, its update is dropped",
                        x.id, deadline, rnd.number, rnd.stage, x.seconds)
        record = self.plan.aggregate_train(self.state, results)
        record["eligible"] = rnd.eligible
        record["selected"] = [d.id for d, _ in rnd.tasks]
        record["failed"] = [[d, reason] for d, reason in failed]
        record["devices"] = [_device_record(d, u) for d, u in results]
        record["late"] = [asdict(x) for x in late]
        # the server waits for its slowest on-time device, or until the deadline once a device is late
        record["round_seconds"] = deadline if late else max((u.metrics.get("seconds", 0.0) for _, u in results),
                                                             default=0.0)
        record["started"] = rnd.started
        record["server_seconds"] = rnd.server_seconds + time.perf_counter() - began  # commit adds the rest
        return record

    def commit(self, record: dict[str, Any]) -> None:
        """Score the global model, then write history.json and the checkpoint. Raises Diverged once no update of
        the last rounds was accepted, Stopped after `stop_after` rounds."""
        began = time.perf_counter()
        if self.evaluator is not None:
            record["accuracy"], record["test_loss"] = self.evaluator.evaluate(record["stage"], self.state.arrays)
        else:
            record["accuracy"], record["test_loss"] = None, None
        record["wall_seconds"] = time.perf_counter() - record.pop("started")
        self.state.history.append(record)
        with interrupts_deferred():  # Ctrl-C lands after a whole checkpoint, never inside one
            save_state(self.state, self.run)
            # evaluation and checkpoint included: history.json has the whole; the checkpoint's copy of this record
            # gets it with the next round's checkpoint
            record["server_seconds"] = record.get("server_seconds", 0.0) + time.perf_counter() - began
            # this process's (device processes are apart): its peak so far, which start-up may have set, and what it
            # holds now, which shows whether the server grows round after round
            record["server_peak_mb"], record["server_rss_mb"] = round(peak_mb(), 1), round(rss_mb(), 1)
            self.write_history()
        if not self.quiet:
            _progress(self.state.round, self.settings.rounds, record)
        try:
            check_divergence(self.state.history, self.settings.max_rejected_rounds, self.settings.lr,
                             self.settings.epochs)
        except ValueError:
            self._end_progress()
            self.report(quietly=True)
            raise
        if self.stop_after is not None and self.state.round >= self.stop_after:
            raise Stopped(f"stopped after round {self.state.round}")

    def write_history(self) -> None:
        """history.json, rewritten whole every round. `server_peak_mb`: the server process's peak RSS so far (the
        largest of this process's and any earlier one's, for a resumed run)."""
        last = self.state.history[-1]
        if self._fleet_json is None:  # one device a line
            lines = (json.dumps(_fleet_entry(i, *self.fleet[i])) for i in sorted(self.fleet))
            self._fleet_json = "[\n" + ",\n".join(lines) + "\n]"
        peaks = [r["server_peak_mb"] for r in self.state.history if r.get("server_peak_mb") is not None]
        doc = {"plan": self.plan.name, "config": self.config, "server_peak_mb": round(max([peak_mb(), *peaks]), 1),
               "fleet": self._fleet_json, "rounds": self.state.history,
               "final": {"accuracy": last["accuracy"], "rounds": self.state.round, "stage": last["stage"]}}
        text = ",\n".join(f"{json.dumps(k)}: {v if k == 'fleet' else json.dumps(v, indent=1, default=float)}"
                          for k, v in doc.items())
        write_atomic(self.run / "history.json", ("{\n" + text + "\n}").encode())

    def report(self, quietly: bool = False) -> Path | None:
        """report.md and plots of the rounds written so far. quietly: for a run that stops with an error, where the
        report helps but must never be the error the user sees (plots need matplotlib, which a server may lack)."""
        from .report import write_report

        self._end_progress()
        if not self.state.history:
            return None
        try:
            path = write_report([self.run], self.run, self.settings.target)
            self.write_history()  # once more: its server_peak_mb now covers the report too
            return path
        except Exception as e:  # noqa: BLE001
            if not quietly:
                raise
            log.warning("could not write the report of %s: %s", self.run, e)
            return None

    def _end_progress(self) -> None:
        if not self.quiet and sys.stderr.isatty():
            sys.stderr.write("\n")


def _fleet_entry(device: int, budget_mb: float, baseline_mb: float) -> dict[str, Any]:
    """A device's line of history.json's fleet: memory_mb is what the node has (budget was rounded to 0.1)."""
    return {"id": device, "budget_mb": budget_mb, "baseline_mb": baseline_mb,
            "memory_mb": round(budget_mb + baseline_mb, 1)}


def _device_record(d: DeviceInfo, u: TrainUpdate) -> dict[str, Any]:
    """A device's line of the round record; `samples` is the weight aggregation gave it (a claim above the count the
    server registered is capped, and kept as `claimed_samples`)."""
    peak = u.metrics.get("peak_mb")
    samples = min(u.num_samples, d.num_samples) if d.num_samples > 0 else u.num_samples
    extra = {"claimed_samples": u.num_samples} if samples != u.num_samples else {}
    # progfl simulate: `seconds` is the simulated device time, this the compute time measured on this machine
    measured = {"measured_seconds": u.metrics["measured_seconds"]} if "measured_seconds" in u.metrics else {}
    return {"id": d.id, "budget_mb": d.budget_mb, "baseline_mb": d.baseline_mb, "peak_mb": peak,
            "seconds": u.metrics.get("seconds"), "samples": samples, **extra, **measured,
            "over_budget": bool(peak is not None and peak > d.budget_mb),
            "torch_imported": bool(u.metrics.get("torch_imported"))}


def _progress(r: int, total: int, record: dict[str, Any]) -> None:
    acc, em = record.get("accuracy"), record.get("em")
    line = (f"round {r:>3}/{total} {record['stage']:<10} acc {acc if acc is None else f'{acc:.3f}'} "
            f"devices {len(record['participants']):>2} em {em if em is None else round(em, 3)}")
    bar = "#" * int(30 * r / total)
    sys.stderr.write(f"\r[{bar:<30}] {line}" if sys.stderr.isatty() else f"[{bar:<30}] {line}\n")
    sys.stderr.flush()


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT until the block ends, then raise KeyboardInterrupt: a checkpoint is written whole or not at all.
    Outside the main thread (a Flower ServerApp may run elsewhere) signals cannot be handled: the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: caught.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
