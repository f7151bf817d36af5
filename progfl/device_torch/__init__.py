"""Device backends that need torch, for boards with no ONNX Runtime training build (Raspberry Pi, Jetson). They live
outside `device_runtime` so that the device runtime itself never imports torch; `device_runtime.backend.open_stage`
imports them only when a device chooses them (`--backend torch|executorch`). Nothing is imported here.

    torch_backend       TorchStage: trains the stage's TorchScript files (exporter/torch_files.py)
    executorch_backend  ExecuTorchStage (EXPERIMENTAL): trains ExecuTorch 1.5.1 programs (exporter/executorch_files.py)
"""
