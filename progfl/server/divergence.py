"""The divergence stop shared by both round loops (progfl simulate and the Flower strategy).

A run in which no update is accepted (devices report that training diverged, or aggregation rejects what they send)
keeps the previous global weights round after round: it can only waste the rest of its budget. After k
consecutive such rounds that had devices selected (rounds where nobody could train, or every device missed the
deadline, neither count nor break the streak), the run stops with Diverged.
The streak is read from the round records, so a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Any


class Diverged(ValueError):
    """Training diverged: no update of the last k rounds with selected devices was accepted (a user setting, so the
    CLI turns it into one line and exit code 2)."""


def rejected_streak(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trailing rounds with selected devices of which no update was accepted, oldest first."""
    streak: list[dict[str, Any]] = []
    for record in reversed(history):
        if not (record.get("selected") or record.get("participants")):
            continue  # nobody trained: says nothing about divergence
        if record.get("late") and not (record.get("participants") or record.get("failed")):
            continue  # every device missed the deadline: slow devices, not a diverged model
        if len(record.get("dropped") or []) < len(record.get("participants") or []):
            break  # at least one update was accepted
        streak.append(record)
    return streak[::-1]


def check_divergence(history: list[dict[str, Any]], max_rejected_rounds: int, lr: float | None = None,
                     epochs: int | None = None) -> None:
    """Raise Diverged once `max_rejected_rounds` (> 0) consecutive rounds with participants had every update
    rejected; 0 never stops."""
    if max_rejected_rounds <= 0:
        return
    streak = rejected_streak(history)
    if len(streak) < max_rejected_rounds:
        return
    streak = streak[-max_rejected_rounds:]
    rounds = [r["round"] for r in streak]
    last = streak[-1]
    why = (last.get("failed") or last.get("dropped") or [[None, "rejected"]])[0][1]
    now = ", ".join(x for x in (f"--lr {lr:g}" if lr is not None else "",
                                f"--epochs {epochs}" if epochs is not None else "") if x)
    raise Diverged(
        f"training diverged: no update of rounds {', '.join(map(str, rounds))} (stage {last.get('stage')}) was "
        f"accepted (e.g. {why}); the run stopped after round {rounds[-1]}, its checkpoint and "
        f"history.json are kept. Try a lower --lr, fewer --epochs" + (f" (now {now})" if now else "")
        + ", or, for a progressive plan, a normalised output module (BatchNorm in its basic layers)")
