"""progfl.server.report: summary numbers match hand-computed values, one table row per run, real PNGs, report.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from progfl.server.report import compare_table, load_history, plot_runs, summarize, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FLEET = [{"id": i, "budget_mb": 256.0 if i < 5 else 512.0} for i in range(10)]
BUDGET = {d["id"]: d["budget_mb"] for d in FLEET}


def _round(n: int, stage: str, participants: list[int], acc: float | None, secs: float, peaks: list[float],
           em: float | None = None, froze: bool = False) -> dict:
    devices = [{"id": p, "budget_mb": BUDGET[p], "peak_mb": pk, "seconds": secs, "samples": 100,
                "over_budget": pk > BUDGET[p]} for p, pk in zip(participants, peaks)]
    return {"round": n, "stage": stage, "phase": 0, "participants": participants, "eligible": 10, "dropped": [],
            "accuracy": acc, "test_loss": None if acc is None else 1.0 - acc, "train_loss": 1.5, "em": em,
            "froze": froze, "freeze_reason": f"em below threshold in {stage}" if froze else "training: em high",
            "devices": devices, "round_seconds": secs, "wall_seconds": secs + 0.1}


def progressive() -> dict:
    """9 rounds, 3 stages, freezes at rounds 3 and 6, device 5 over budget in round 4 (600 MB of 512)."""
    rounds = [
        _round(1, "grow-0", [0, 1], 0.20, 1.0, [100.0, 120.0], em=0.9),
        _round(2, "grow-0", [1, 2], 0.35, 2.0, [110.0, 100.0], em=0.5),
        _round(3, "grow-0", [2, 3], None, 1.5, [100.0, 100.0], em=0.1, froze=True),
        _round(4, "grow-1", [4, 5, 0], 0.50, 2.5, [200.0, 600.0, 180.0], em=0.8),
        _round(5, "grow-1", [0, 1], 0.62, 1.0, [190.0, 200.0], em=0.4),
        _round(6, "grow-1", [3, 4], 0.70, 3.0, [200.0, 210.0], em=0.05, froze=True),
        _round(7, "grow-2", [0, 2], 0.74, 2.0, [150.0, 150.0], em=0.7),
        _round(8, "grow-2", [1, 3], 0.81, 2.0, [160.0, 150.0], em=0.3),
        _round(9, "grow-2", [2, 4], 0.80, 1.0, [150.0, 160.0], em=0.2),
    ]
    return {"plan": "profl", "config": {"seed": 1, "rounds": 9, "target_accuracy": 0.7}, "fleet": FLEET,
            "rounds": rounds, "final": {"accuracy": 0.80, "rounds": 9}}


def fedavg() -> dict:
    """5 rounds of the full model; every device trains once; never reaches 0.7."""
    accs = [0.30, 0.50, 0.60, 0.65, 0.68]
    rounds = [_round(n + 1, "full", [2 * n, 2 * n + 1], a, 4.0, [100.0, 128.0]) for n, a in enumerate(accs)]
    return {"plan": "fedavg", "config": {"seed": 1, "rounds": 5, "target_accuracy": None}, "fleet": FLEET,
            "rounds": rounds, "final": {"accuracy": 0.68, "rounds": 5}}


def _write_run(root: Path, name: str, history: dict) -> Path:
    d = root / name
    d.mkdir()
    (d / "history.json").write_text(json.dumps(history))
    return d


def test_summarize_progressive_matches_hand_computed() -> None:
    s = summarize(progressive(), 0.7)
    assert s["final_accuracy"] == 0.80 and s["best_accuracy"] == 0.81 and s["rounds"] == 9
    assert s["rounds_to_target"] == 6
    assert s["device_seconds_to_target"] == pytest.approx(1.0 + 2.0 + 1.5 + 2.5 + 1.0 + 3.0)  # 11.0
    assert s["device_seconds_total"] == pytest.approx(16.0)
    assert s["participation_share"] == pytest.approx(0.6)  # devices 0..5 of 10
    assert s["mean_participants"] == pytest.approx(19 / 9)
    assert s["max_peak_ratio"] == pytest.approx(600 / 512)
    assert s["over_budget_device_rounds"] == 1
    assert [(st["stage"], st["first"], st["last"]) for st in s["stages"]] == [
        ("grow-0", 1, 3), ("grow-1", 4, 6), ("grow-2", 7, 9)]
    assert [st["freeze_reason"] for st in s["stages"]] == [
        "em below threshold in grow-0", "em below threshold in grow-1", None]


def test_summarize_target_defaults_and_unreached() -> None:
    assert summarize(progressive())["rounds_to_target"] == 6  # config.target_accuracy = 0.7
    assert summarize(progressive(), 0.8)["rounds_to_target"] == 8  # the null accuracy of round 3 is skipped
    assert summarize(progressive(), 0.8)["device_seconds_to_target"] == pytest.approx(15.0)
    s = summarize(fedavg(), 0.7)
    assert s["rounds_to_target"] is None and s["device_seconds_to_target"] is None
    assert s["participation_share"] == 1.0 and s["over_budget_device_rounds"] == 0
    assert s["max_peak_ratio"] == pytest.approx(0.5)  # 128 MB on a 256 MB device
    assert summarize(fedavg())["rounds_to_target"] is None  # no target at all


def test_compare_table_one_row_per_run() -> None:
    table = compare_table([progressive(), fedavg()], target=0.7)
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 4  # header, separator, two runs
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows[2:]}
    assert cells["profl"] == ["0.800", "0.810", "9", "6", "11.0", "60", "1.17", "1"]
    assert cells["fedavg"] == ["0.680", "0.680", "5", "—", "—", "100", "0.50", "0"]


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))


def test_plot_runs_writes_valid_pngs(tmp_path: Path) -> None:
    paths = plot_runs([progressive(), fedavg()], tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["accuracy.png", "em.png", "memory.png"]
    for p in paths:
        _check_png(p)
    assert sorted(q.name for q in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)  # no temp files left
    only_fedavg = plot_runs([fedavg()], tmp_path / "fedavg")
    assert sorted(p.name for p in only_fedavg) == ["accuracy.png", "memory.png"]  # no EM, no em.png


def test_write_report_many_and_single(tmp_path: Path) -> None:
    runs = [_write_run(tmp_path, "profl", progressive()), _write_run(tmp_path, "fedavg", fedavg())]
    report = write_report(runs, tmp_path / "out", target=0.7)
    assert report == tmp_path / "out" / "report.md"
    text = report.read_text()
    assert report.stat().st_mode & 0o044 == 0o044  # shareable, not mkstemp's 0600
    assert compare_table([progressive(), fedavg()], target=0.7) in text
    for name in ("accuracy", "em", "memory"):
        assert f"![{name}]({name}.png)" in text
        _check_png(tmp_path / "out" / f"{name}.png")
    assert "`grow-1`: rounds 4–6 (frozen: em below threshold in grow-1)" in text
    assert "`grow-2`: rounds 7–9 (not frozen)" in text
    single = write_report([runs[0]], tmp_path / "single").read_text()
    assert single.count("| profl |") == 1 and "| fedavg |" not in single


def test_same_plan_twice_gets_distinct_labels(tmp_path: Path) -> None:
    runs = [_write_run(tmp_path, "a", progressive()), _write_run(tmp_path, "b", progressive())]
    text = write_report(runs, tmp_path / "out").read_text()
    assert "### profl #1" in text and "### profl #2" in text


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", '{"plan": "x"}', b"\xff\xfe\x00"])
def test_load_history_rejects_missing_or_corrupt(tmp_path: Path, content: str | bytes | None) -> None:
    if isinstance(content, bytes):
        (tmp_path / "history.json").write_bytes(content)
    elif content is not None:
        (tmp_path / "history.json").write_text(content)
    with pytest.raises(ValueError, match="history.json"):
        load_history(tmp_path)
    with pytest.raises(ValueError):
        write_report([tmp_path], tmp_path / "out")


def test_load_history_roundtrip(tmp_path: Path) -> None:
    assert load_history(_write_run(tmp_path, "run", progressive())) == progressive()


def test_import_is_cheap() -> None:
    """Importing the module must not pull in matplotlib (or torch): commands that never plot start fast."""
    code = ("import sys, progfl.server.report; "
            "print(sorted(m for m in ('matplotlib', 'torch', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
