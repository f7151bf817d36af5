"""Turn simulation runs (`history.json` per run folder) into numbers, one comparison table, plots and `report.md`.

Standard library only at import time; matplotlib is imported inside the plotting functions so that
`progfl` commands that never plot stay cheap to start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..manifest import write_atomic

HISTORY = "history.json"
COLUMNS = ["plan", "final acc", "best acc", "rounds", "rounds to target", "device-time to target (s)",
           "devices that took part (%)", "max peak/budget", "over-budget device-rounds"]


def load_history(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read `run_dir/history.json`; a missing or broken file is one clear ValueError, not a KeyError later."""
    path = Path(run_dir) / HISTORY
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found (is {run_dir} a run folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable history ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("plan"), str) or not isinstance(doc.get("rounds"), list):
        raise ValueError(f"{path}: not a run history (needs a 'plan' string and a 'rounds' list)")
    return doc


def _stages(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive runs of the same stage, in order, with the reason the stage was frozen (None if it never was)."""
    out: list[dict[str, Any]] = []
    for r in rounds:
        if not out or out[-1]["stage"] != r.get("stage"):
            out.append({"stage": r.get("stage"), "first": r["round"], "last": r["round"], "freeze_reason": None})
        out[-1]["last"] = r["round"]
        if r.get("froze"):
            out[-1]["freeze_reason"] = r.get("freeze_reason")
    return out


def summarize(history: dict[str, Any], target_accuracy: float | None = None) -> dict[str, Any]:
    """The numbers a comparison needs; the target defaults to the run's own `config.target_accuracy`."""
    if target_accuracy is None:
        target_accuracy = history.get("config", {}).get("target_accuracy")
    rounds = history["rounds"]
    accs = [r["accuracy"] for r in rounds if r.get("accuracy") is not None]
    final = history.get("final", {}).get("accuracy")
    hit = None if target_accuracy is None else next(
        (i for i, r in enumerate(rounds) if r.get("accuracy") is not None and r["accuracy"] >= target_accuracy), None)
    seconds = [float(r.get("round_seconds") or 0.0) for r in rounds]
    fleet = {d["id"] for d in history.get("fleet", [])}
    took_part = {p for r in rounds for p in r.get("participants", [])}
    server = [float(r["server_seconds"]) for r in rounds if r.get("server_seconds") is not None]
    device_rounds = [d for r in rounds for d in r.get("devices", [])]
    ratios = [d["peak_mb"] / d["budget_mb"] for d in device_rounds if d.get("budget_mb")]
    return {
        "plan": history["plan"],
        "target_accuracy": target_accuracy,
        "final_accuracy": final if final is not None else (accs[-1] if accs else None),
        "best_accuracy": max(accs) if accs else None,
        "rounds": len(rounds),
        "rounds_to_target": None if hit is None else rounds[hit]["round"],
        "device_seconds_to_target": None if hit is None else sum(seconds[: hit + 1]),
        "device_seconds_total": sum(seconds),
        "participation_share": len(took_part & fleet) / len(fleet) if fleet else None,
        "mean_participants": sum(len(r.get("participants", [])) for r in rounds) / len(rounds) if rounds else 0.0,
        "max_peak_ratio": max(ratios) if ratios else None,
        "over_budget_device_rounds": sum(
            bool(d.get("over_budget", d["peak_mb"] > d["budget_mb"])) for d in device_rounds),
        "stages": _stages(rounds),
        # the server's own cost (configure, aggregate, evaluate, checkpoint; not the devices' training)
        "server_peak_mb": history.get("server_peak_mb"),
        "server_seconds_per_round": sum(server) / len(server) if server else None,
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def compare_table(histories: list[dict[str, Any]], target: float | None = None) -> str:
    """One markdown row per run; missing values ("never reached the target") show as a dash."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for h in histories:
        s = summarize(h, target)
        share = None if s["participation_share"] is None else 100 * s["participation_share"]
        cells = [s["plan"], _fmt(s["final_accuracy"]), _fmt(s["best_accuracy"]), str(s["rounds"]),
                 _fmt(s["rounds_to_target"], "d"), _fmt(s["device_seconds_to_target"], ".1f"), _fmt(share, ".0f"),
                 _fmt(s["max_peak_ratio"], ".2f"), str(s["over_budget_device_rounds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _labels(histories: list[dict[str, Any]]) -> list[str]:
    """Plan names, numbered when the same plan appears more than once (e.g. several seeds)."""
    plans = [h["plan"] for h in histories]
    return [p if plans.count(p) == 1 else f"{p} #{plans[:i].count(p) + 1}" for i, p in enumerate(plans)]



def _save_png(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # render with Agg whatever the session's default backend is
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))  # never half a PNG
    return path


def _is_progressive(h: dict[str, Any]) -> bool:
    return len(_stages(h["rounds"])) > 1 or any(r.get("em") is not None for r in h["rounds"])


def plot_runs(histories: list[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """accuracy.png, em.png (only if some run has EM) and memory.png (only if devices were recorded)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels, written = _labels(histories), []

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for i, (h, label) in enumerate(zip(histories, labels)):
        pts = [(r["round"], r["accuracy"]) for r in h["rounds"] if r.get("accuracy") is not None]
        if pts:
            ax.plot(*zip(*pts), color=f"C{i}", marker="o", markersize=3, label=label)
        if _is_progressive(h):
            for st in _stages(h["rounds"])[1:]:
                ax.axvline(st["first"] - 0.5, color=f"C{i}", alpha=0.35, linestyle="--", linewidth=1)
    ax.set(xlabel="round", ylabel="test accuracy", title="Accuracy per round (dashed: stage changes)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    written.append(_save_png(fig, out / "accuracy.png"))

    em_runs = [(h, label) for h, label in zip(histories, labels) if any(r.get("em") is not None for r in h["rounds"])]
    if em_runs:
        fig = Figure(figsize=(8, 3.2 * len(em_runs)))
        for k, (h, label) in enumerate(em_runs):
            ax = fig.add_subplot(len(em_runs), 1, k + 1)
            for j, st in enumerate(_stages(h["rounds"])):
                pts = [(r["round"], r["em"]) for r in h["rounds"]
                       if st["first"] <= r["round"] <= st["last"] and r.get("em") is not None]
                if pts:
                    ax.plot(*zip(*pts), color=f"C{j}", marker="o", markersize=3, label=st["stage"])
            froze = [(r["round"], r["em"]) for r in h["rounds"] if r.get("froze") and r.get("em") is not None]
            if froze:
                ax.scatter(*zip(*froze), marker="X", s=90, color="black", zorder=3, label="froze")
            for r in h["rounds"]:
                if r.get("froze"):
                    ax.axvline(r["round"], color="black", alpha=0.3, linewidth=1)
            ax.set(xlabel="round", ylabel="effective movement", title=f"{label}: EM per round, by stage")
            ax.grid(alpha=0.3)
            ax.legend(loc="upper right", fontsize="small")
        fig.tight_layout()
        written.append(_save_png(fig, out / "em.png"))

    mem = [(label, [(d["budget_mb"], d["peak_mb"]) for r in h["rounds"] for d in r.get("devices", [])])
           for h, label in zip(histories, labels)]
    if any(pts for _, pts in mem):
        fig = Figure(figsize=(6.5, 6))
        ax = fig.add_subplot()
        markers = "osD^vP*"
        for i, (label, pts) in enumerate(mem):
            if pts:
                ax.scatter(*zip(*pts), s=22, alpha=0.55, color=f"C{i}", marker=markers[i % len(markers)], label=label)
        top = max(max(b, p) for _, pts in mem for b, p in pts) * 1.08
        ax.plot([0, top], [0, top], color="red", linewidth=1)
        ax.set(xlim=(0, top), ylim=(0, top), xlabel="budget (MB)", ylabel="peak (MB)",
               title="Peak memory per device-round (above the red line = over budget)")
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        ax.legend(handles + [Line2D([], [], color="red")], names + ["peak = budget"], loc="upper left")
        written.append(_save_png(fig, out / "memory.png"))
    return written


def _timeline(h: dict[str, Any], label: str) -> list[str]:
    lines = [f"### {label}", ""]
    for st in _stages(h["rounds"]):
        span = f"round {st['first']}" if st["first"] == st["last"] else f"rounds {st['first']}–{st['last']}"
        why = f"frozen: {st['freeze_reason']}" if st["freeze_reason"] else "not frozen"
        lines.append(f"- `{st['stage']}`: {span} ({why})")
    return lines + [""]


def write_report(run_dirs: list[Path], out_dir: Path, target: float | None = None) -> Path:
    """Load every run, write the plots and `report.md` into `out_dir`; one run or many."""
    histories = [load_history(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot_runs(histories, out)
    targets = {summarize(h, target)["target_accuracy"] for h in histories}
    target_text = ", ".join("none" if t is None else f"{t:.3f}" for t in sorted(targets, key=lambda t: t or -1))
    lines = [f"# progfl report: {', '.join(h['plan'] for h in histories)}", "",
             f"Runs: {', '.join(f'`{d}`' for d in run_dirs)}. Target accuracy: {target_text}.", "",
             compare_table(histories, target), "## Stage timeline", ""]
    for h, label in zip(histories, _labels(histories)):
        lines += _timeline(h, label)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    lines += [
        "## How to read this", "",
        "- *Rounds / device-time to target*: first round whose test accuracy reached the target, and the simulated "
        "device time (sum over rounds of the slowest participant) up to it; a dash means never reached.",
        "- *Devices that took part*: share of the fleet that trained at least once; low values mean the plan "
        "excluded memory-poor devices.",
        "- *Max peak/budget* above 1.00 and *over-budget device-rounds* > 0 mean a device would have run out "
        "of memory; in `memory.png` those are the points above the red line.",
        "- In `em.png`, effective movement (EM) falling towards zero is what triggers a freeze (black X).", "",
    ]
    write_atomic(out / "report.md", "\n".join(lines).encode())
    return out / "report.md"
