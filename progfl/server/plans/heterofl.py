"""HeteroFL (Diao, Ding, Tarokh, ICLR 2021): each device trains the widest sub-model its budget holds (1, 1/2, 1/4 or
1/8 of every hidden width), always the first channels of each layer; the server averages each element over the
devices that trained it (plans/width.py)."""

from __future__ import annotations

from .width import WidthPlan


class HeteroFL(WidthPlan):
    name = "heterofl"
