"""`make arm-check`: progfl's device runtime on an emulated Raspberry Pi 4 (cortex-a72) and Pi 5 (cortex-a76).

On x86 (this interpreter, the server-side install): export a small model with the torch backend, write a shard of real
MNIST digits, train one stage with the torch backend and with the ORT backend. Under qemu, with the aarch64 wheels a Pi
gets (build.sh) and progfl's own built wheel: `progfl device train --backend torch` on the same stage, weights and shard,
then `progfl device profile --backend torch`, whose JSON `progfl apply-profile` feeds back into the manifest here.
The updates are compared array by array. Everything lives under ARM_DIR/check (made anew each run).

    python tools/armpi/arm_check.py ARM_DIR      (ARM_DIR built by tools/armpi/build.sh)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CPUS = {"cortex-a76": "Pi 5", "cortex-a72": "Pi 4"}  # the Pi 4 last: its line is the summary's first
STAGE = "grow-1"


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"arm-check: FAILED: {' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


def progfl_x86(*args) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "progfl.cli", *args, cwd=ROOT)


def progfl_arm(arm: Path, cpu: str, *args) -> subprocess.CompletedProcess:
    """progfl's installed wheel (arm/progfl) under qemu; cwd outside the source tree so `-m` cannot pick it up."""
    env = {"ARM_PYTHONPATH": str(arm / "progfl"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    return run(ROOT / "tools/armpi/run.sh", arm, cpu, "-m", "progfl.cli", *args, env=env, cwd=arm)


def max_diff(a: Path, b: Path) -> float:
    with np.load(a) as x, np.load(b) as y:
        if set(x.files) != set(y.files):
            sys.exit(f"arm-check: FAILED: {a.name} and {b.name} hold different arrays")
        return max(float(np.abs(x[k].astype(np.float64) - y[k]).max()) for k in x.files)


def main(arm: Path) -> int:
    work = arm / "check"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # progfl as a Pi installs it: the built wheel, no dependencies (those are build.sh's pinned aarch64 wheels)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", work / "dist", ROOT)
    shutil.rmtree(arm / "progfl", ignore_errors=True)
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", arm / "progfl",
        next((work / "dist").glob("progfl-*.whl")))

    from progfl.data.datasets import mnist5k

    train, _ = mnist5k(seed=0)
    np.savez(work / "shard.npz", x=train.x[:64], y=train.y[:64])
    art = work / "art"
    progfl_x86("export", "--model", "cnn", "--input-shape", "1,28,28", "--width", "8", "--stages", "grow,full",
               "--batch", "16", "--out", art, "--no-measure")
    common = ["--artifacts", art, "--stage", STAGE, "--data", work / "shard.npz", "--epochs", "1", "--lr", "0.05",
              "--threads", "2"]
    x86 = {b: json.loads(progfl_x86("device", "train", *common, "--backend", b, "--out", work / f"x86-{b}.npz").stdout)
           for b in ("torch", "ort")}
    print(f"x86_64 torch step {x86['torch']['step_ms']:.1f} ms, ort step {x86['ort']['step_ms']:.1f} ms; "
          f"torch vs ort max |diff| = {max_diff(work / 'x86-torch.npz', work / 'x86-ort.npz'):.2e}", flush=True)

    results = {}
    for cpu, board in CPUS.items():
        t0 = time.perf_counter()
        r = json.loads(progfl_arm(arm, cpu, "device", "train", *common, "--backend", "torch",
                                  "--out", work / f"{cpu}.npz").stdout)
        wall = time.perf_counter() - t0
        profile = work / f"{cpu}-profile.json"
        progfl_arm(arm, cpu, "device", "profile", "--artifacts", art, "--backend", "torch", "--batches", "2,16",
                   "--steps", "2", "--threads", "2", "--out", profile)
        progfl_x86("apply-profile", art, profile, "--device-class", f"emulated-{cpu}", "--memory-mb", "2048")
        board_profile = json.loads(profile.read_text())
        peaks = {f"{row['stage']}@{row['batch']}": row["peak_mb"] for row in board_profile["results"]}
        results[cpu] = {"board": board, "diff_torch": max_diff(work / f"{cpu}.npz", work / "x86-torch.npz"),
                        "diff_ort": max_diff(work / f"{cpu}.npz", work / "x86-ort.npz"), "step_ms": r["step_ms"],
                        "peak_mb": r["peak_mb"], "wall_s": round(wall, 1), "profile_peaks": peaks,
                        "engine": board_profile["engine"]}
        print(f"{cpu} ({board}, emulated): {STAGE} step {r['step_ms']:.0f} ms, round peak {r['peak_mb']:.0f} MB, "
              f"command {wall:.0f} s; vs x86 torch max |diff| = {results[cpu]['diff_torch']:.2e}, vs x86 ORT "
              f"{results[cpu]['diff_ort']:.2e}; profile peaks {peaks}", flush=True)
    (work / "result.json").write_text(json.dumps(results, indent=1))
    worst = max(max(v["diff_torch"], v["diff_ort"]) for v in results.values())
    status = "ok" if worst < 1e-4 else "FAILED (bound 1e-4)"
    a72, a76 = results["cortex-a72"], results["cortex-a76"]
    print(f"arm-check: aarch64 cortex-a72 (Pi 4) {a72['engine']}, {STAGE} update vs x86 torch/ORT: "
          f"max |diff| = {max(a72['diff_torch'], a72['diff_ort']):.2e}; cortex-a76 (Pi 5): "
          f"max |diff| = {max(a76['diff_torch'], a76['diff_ort']):.2e}; {status}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/armpi/arm_check.py ARM_DIR")
    sys.exit(main(Path(sys.argv[1]).resolve()))
