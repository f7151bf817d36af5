"""ProFL (Wu, Li, Xu, KDD 2025): progressive shrinking, then progressive growing.

Shrinking, back to front, for t = T-1 .. 1: train block t (blocks < t frozen) through its output module, then
fit basic layer t to the model's logits with the real block (distillation, MSE, no labels). The basic layers
become the output modules; the trained blocks are the growing stage's starting weights. Growing, front to
back: train block t + output module. As the paper's Figure 1 says, the block-freezing determination runs
"during both stages": every step, shrinking ones included, ends when effective movement says it has converged.

Options:
- shrink_rounds: cap on the rounds of each shrinking grow-t step. Default: the step's even share of
  shrink_share (0.3) of the round budget, floor(0.3 x rounds / (2 (T-1))), at least 1 and at most the pace's
  max_rounds: 5 for 100 rounds of a 4-block model, 2 for 40. Its least rounds are the pace's min_rounds,
  clipped to the cap. Why a share of the budget: shrinking only prepares output modules and starting weights,
  and with a fixed cap of 10 a step its six steps took 60 of 100 rounds whenever EM did not settle (MNIST-5k,
  label-Dirichlet 0.1: every step ran to its cap). Growing was then left 40 rounds for four blocks, the budget
  rule gave the last three 5 rounds each, and the run ended at 0.666.
- distill_rounds: the same cap for each distill-t step (same default).
- shrink_share: the share of the round budget the default caps give shrinking (default 0.3).
- distill_lr: the distillation steps' learning rate. Default: the plan's lr, except with ProFL's own linear
  basic layers (`--output-module linear`, and exports made before output modules had kinds), where it is 1e-3.
  The MSE fit through a linear stack of basic layers is unstable at the training lr; with normalised basic
  layers (conv, light) it is not. Measured with a width-8 ResNet-18 on MNIST-5k (label-Dirichlet 0.5, 20
  devices, 5 a round, 5 local epochs):
  - linear, 6 rounds a distill step: at 0.05 every update of distill-1 was NaN from its first round; at 0.01
    its loss went 2.1, 1.0, 2.5, 7.9, 18.8, 4.9; at 1e-3 it fell from 3.1 to 1.7;
  - conv, 2 rounds a distill step, training lr 0.05: at distill lr 0.05 the three steps' losses went
    0.42 -> 0.29, 0.72 -> 0.45 and 0.43 -> 0.16, no update rejected; at 1e-3, 0.82 -> 0.72, 1.18 -> 1.20 and
    0.64 -> 0.53.
  The authors used SGD lr 1e-5 over far more rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Phase, Plan

SHRINK_SHARE = 0.3  # default share of the round budget the shrinking steps' caps add up to
LINEAR_DISTILL_LR = 1e-3  # distillation lr through ProFL's linear basic layers (see distill_lr above)


@dataclass(frozen=True)
class ProFLOptions:
    shrink_rounds: int | None = None  # None: the default cap (see the module docstring)
    distill_rounds: int | None = None
    shrink_share: float = SHRINK_SHARE
    distill_lr: float | None = None  # None: the plan's lr, 1e-3 with linear basic layers

    def __post_init__(self) -> None:
        for key in ("shrink_rounds", "distill_rounds"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer (a cap on rounds), got {getattr(self, key)}")
        if not 0 < self.shrink_share < 1:
            raise ValueError(f"shrink_share must be in (0, 1), got {self.shrink_share}")
        if self.distill_lr is not None and not self.distill_lr > 0:
            raise ValueError(f"distill_lr must be > 0, got {self.distill_lr}")


class ProFL(Plan):
    name = "profl"
    kinds = ("grow", "distill")
    Options = ProFLOptions

    def build_phases(self) -> list[Phase]:
        o, T = self.options, max(s.block for s in self.manifest.stages if s.kind == "grow") + 1
        even = int(o.shrink_share * self.config.rounds // (2 * (T - 1))) if T > 1 else 1
        default = min(max(1, even), self.config.pace.max_rounds)
        shrink_cap, distill_cap = o.shrink_rounds or default, o.distill_rounds or default
        linear = self.manifest.model_config.get("output_module", "linear") == "linear"
        distill_lr = o.distill_lr or (LINEAR_DISTILL_LR if linear else None)  # None: the plan's lr
        shrink = []
        for t in range(T - 1, 0, -1):
            shrink += [Phase(f"grow-{t}", "em", max_rounds=shrink_cap),
                       Phase(f"distill-{t}", "em", max_rounds=distill_cap, lr=distill_lr)]
        return shrink + [Phase(f"grow-{t}") for t in range(T)]
