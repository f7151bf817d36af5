"""Peak resident memory of this process, per phase.

VmHWM (/proc/self/status) counts native allocations that tracemalloc misses (ONNX Runtime's). Writing 5 to
/proc/self/clear_refs resets it to the current RSS, so each phase is measured on its own; where the kernel
refuses (or off Linux) ru_maxrss, the process-lifetime peak, is the fallback and `resettable` says so.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_mb(key: str, status: Path = _STATUS) -> float | None:
    try:
        for line in status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mb() -> float:
    now = _status_mb("VmRSS")
    return now if now is not None else peak_mb()


def transport_mb() -> float:
    """What a device's Flower transport holds now: this process (the ClientApp) and its ancestors while they are
    Flower's (flwr-clientapp <- flower-superexec <- flower-supernode in 1.41's default subprocess isolation), each
    by its proportional set size (shared pages split between the processes that map them) where Linux reports it,
    else its RSS. Off Linux: this process's peak."""
    if not Path("/proc/self").exists():
        return peak_mb()
    total, pid = 0.0, os.getpid()
    while pid > 1:
        proc = Path(f"/proc/{pid}")
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            break
        if pid != os.getpid() and b"flower-" not in cmdline and b"flwr-" not in cmdline:
            break
        total += _status_mb("Pss", proc / "smaps_rollup") or _status_mb("VmRSS", proc / "status") or 0.0
        try:
            pid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return total


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim), so that memory a finished phase freed is
    not still counted in the next phase's peak. A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def reset_peak() -> bool:
    """Start a new phase; False when the peak cannot be reset (then peaks are since process start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PhasePeak:
    """with PhasePeak() as p: ...  -> p.peak_mb: the high-water mark of that block (process-wide if not resettable)."""

    def __enter__(self) -> PhasePeak:
        self.resettable = reset_peak()
        self.start_mb = rss_mb()
        self._first_phase = len(PhaseLog.active.phases) if PhaseLog.active else 0
        return self

    def __exit__(self, *exc) -> None:
        inner = PhaseLog.active.phases[self._first_phase:] if PhaseLog.active else []  # their marks reset the peak
        self.peak_mb = max([peak_mb(), *(p.peak_mb for p in inner)])


@dataclass
class Phase:
    """What the process held after one phase of a round (rss_mb) and the most it held during it (peak_mb)."""

    name: str
    rss_mb: float
    peak_mb: float


class PhaseLog:
    """with PhaseLog() as log: ... -> log.phases: one Phase per mark(name) reached inside the block (the probe's
    breakdown of where a stage's memory goes). Outside such a block, mark() costs one attribute read."""

    active: PhaseLog | None = None

    def __enter__(self) -> PhaseLog:
        self.phases: list[Phase] = []
        self.resettable = reset_peak()
        PhaseLog.active = self
        return self

    def __exit__(self, *exc) -> None:
        PhaseLog.active = None

    def record(self, name: str) -> None:
        self.phases.append(Phase(name, round(rss_mb(), 1), round(peak_mb(), 1)))
        reset_peak()


def mark(name: str) -> None:
    """End of a phase named `name`, when a PhaseLog is recording (the trainer and backends call it at fixed points)."""
    if PhaseLog.active is not None:
        PhaseLog.active.record(name)
