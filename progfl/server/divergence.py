"""The divergence stop shared by both round loops (progfl simulate and the Flower strategy).

A run whose every update is rejected by aggregation (NaN/Inf weights, ...) keeps the previous global weights
round after round: it can only waste the rest of its budget. After k consecutive such rounds that had
participants (rounds where nobody could train neither count nor break the streak), the run stops with Diverged.
The streak is read from the round records, so a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Any


class Diverged(ValueError):
    """Training diverged: every update of the last k rounds with participants was rejected (a user setting, so the
    CLI turns it into one line and exit code 2)."""


def rejected_streak(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trailing rounds with participants whose every update was rejected, oldest first."""
    streak: list[dict[str, Any]] = []
    for record in reversed(history):
        if not record.get("participants"):
            continue  # nobody trained: says nothing about divergence
        if len(record.get("dropped") or []) < len(record["participants"]):
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
    why = streak[-1]["dropped"][0][1] if streak[-1].get("dropped") else "rejected"
    now = ", ".join(x for x in (f"--lr {lr:g}" if lr is not None else "",
                                f"--epochs {epochs}" if epochs is not None else "") if x)
    raise Diverged(
        f"training diverged: every update of rounds {', '.join(map(str, rounds))} (stage {streak[-1].get('stage')}) "
        f"was rejected by aggregation (e.g. {why}); the run stopped after round {rounds[-1]}, its checkpoint and "
        f"history.json are kept. Try a lower --lr, fewer --epochs" + (f" (now {now})" if now else "")
        + ", or, for a progressive plan, a normalised output module (BatchNorm in its basic layers)")
