"""Import onnxruntime's training API without torch (toolchain bug 1).

`onnxruntime/training/__init__.py` imports torch-dependent modules (ORTModule, amp, optim); the on-device
API under `onnxruntime.training.api` needs only numpy and `onnxruntime.capi`. Registering a bare package
for `onnxruntime.training` first lets `.api` import on a device without torch, and saves ~230 MB of RSS
where torch happens to be installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _load_api():
    """Register a bare `onnxruntime.training` package (and hide ORTModule) before onnxruntime is imported:
    onnxruntime's build validation imports `training.ortmodule`, which imports torch."""
    name = "onnxruntime.training"
    if name not in sys.modules and "onnxruntime" not in sys.modules:
        root = importlib.util.find_spec("onnxruntime")
        if root is None or not root.submodule_search_locations:
            raise ImportError("onnxruntime is not installed: install onnxruntime-training-cpu==1.19.2")
        spec = importlib.util.spec_from_file_location(
            name, f"{root.submodule_search_locations[0]}/training/__init__.py",
            submodule_search_locations=[f"{root.submodule_search_locations[0]}/training"])
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules[name] = pkg
        sys.modules[name + ".ortmodule"] = None  # import of it raises ImportError: "ORTModule not present"
    try:
        from onnxruntime.training import api
    except ImportError as e:
        raise ImportError(f"onnxruntime has no training API ({e}): install onnxruntime-training-cpu==1.19.2") from None
    return api


api = _load_api()
import onnxruntime  # noqa: E402  (after the shim, on purpose)

CheckpointState = api.CheckpointState
Module = api.Module
Optimizer = api.Optimizer
OrtValue = onnxruntime.OrtValue
InferenceSession = onnxruntime.InferenceSession
SessionOptions = onnxruntime.SessionOptions
