"""The progfl server: pacing (when to freeze a block), aggregation, participant selection, checkpoints.

numpy + standard library only (no torch, no onnx): the server also runs inside Flower apps.

    rounds      RoundEngine: one run's rounds (configure, aggregate, commit), written once for every transport
    simulation  the local transport (`progfl simulate`): device processes on this machine (workers.DevicePool)
    flower      the Flower transport: a ServerApp whose strategy drives the round engine
    plans/      one small file per plan; settings: typed --pace/--option keys
    pace, selection, aggregate, state, divergence, evaluate, fleet, report: the pieces the engine composes
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
