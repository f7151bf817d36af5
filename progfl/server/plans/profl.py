"""ProFL (Wu, Li, Xu, KDD 2025): progressive shrinking, then progressive growing.

Shrinking, back to front, for t = T-1 .. 1: train block t (blocks < t frozen) through its output module, then
fit basic layer t to the model's logits with the real block (distillation, MSE, no labels). The basic layers
become the output modules; the trained blocks are the growing stage's starting weights. Growing, front to
back: train block t + output module, freeze it when effective movement says it has converged.
Options: shrink_rounds (rounds per shrinking step, default 2), distill_rounds (default 2), distill_lr (default
1e-3; the authors used SGD lr 1e-5 over far more rounds. At the training lr (0.05) the MSE fit through the linear
stack of basic layers diverged: basic-layer weights reached 6e16 and every later update was NaN).
"""

from __future__ import annotations

from .base import Phase, Plan


class ProFL(Plan):
    name = "profl"
    kinds = ("grow", "distill")

    def build_phases(self) -> list[Phase]:
        o, T = self.config.options, max(s.block for s in self.manifest.stages if s.kind == "grow") + 1
        shrink = []
        for t in range(T - 1, 0, -1):
            shrink += [Phase(f"grow-{t}", "fixed", o.get("shrink_rounds", 2)),
                       Phase(f"distill-{t}", "fixed", o.get("distill_rounds", 2), lr=o.get("distill_lr", 1e-3))]
        return shrink + [Phase(f"grow-{t}") for t in range(T)]
