"""The progfl server: pacing (when to freeze a block), aggregation, participant selection, checkpoints.

numpy + standard library only (no torch, no onnx): the server also runs inside Flower apps.
"""

from progfl.server.aggregate import Aggregator
from progfl.server.divergence import Diverged
from progfl.server.pace import PaceConfig, PaceController, effective_movement, freeze_rule, slope
from progfl.server.selection import DeviceInfo, Selector, SmartFreezeSelector, UniformSelector, eligible
from progfl.server.state import ServerState, StateError, load_state, restore_rng, save_state

__all__ = [
    "Aggregator",
    "DeviceInfo",
    "Diverged",
    "PaceConfig",
    "PaceController",
    "Selector",
    "ServerState",
    "SmartFreezeSelector",
    "StateError",
    "UniformSelector",
    "effective_movement",
    "eligible",
    "freeze_rule",
    "load_state",
    "restore_rng",
    "save_state",
    "slope",
]
