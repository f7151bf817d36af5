"""Progressive-training plans and baselines (full-model: FedAvg, ExclusiveFL; width-scaled: HeteroFL, FedRolex,
AllSmall; depth-scaled: DepthFL), by name."""

from .allsmall import AllSmall
from .base import Phase, Plan, PlanConfig
from .baselines import Exclusive, FedAvg
from .depthfl import DepthFL
from .fedrolex import FedRolex
from .heterofl import HeteroFL
from .neulite import NeuLite
from .profl import ProFL
from .smartfreeze import SmartFreeze

PLANS: dict[str, type[Plan]] = {p.name: p for p in (ProFL, NeuLite, SmartFreeze, FedAvg, Exclusive, HeteroFL,
                                                     FedRolex, AllSmall, DepthFL)}


def make_plan(name: str, manifest, config: PlanConfig) -> Plan:
    if name not in PLANS:
        raise ValueError(f"unknown plan {name!r}: choose from {', '.join(PLANS)}")
    return PLANS[name](manifest, config)


__all__ = ["PLANS", "Phase", "Plan", "PlanConfig", "make_plan"]
