"""Server side: torch -> ONNX -> ONNX Runtime training artifacts (and TorchScript files for torch boards), sized to
device memory.

    export       export_model: every stage into one folder with manifest, memory table and device sizing
    compile      compile_stage: one stage's graphs -> ONNX -> ORT training artifacts (named steps)
    torch_files  the torch backend's TorchScript files of a stage
    fixes        ONNX edits around onnxruntime-training 1.19.2's bugs
    output_module  which basic layers the output modules use, and why
    sizing       memory estimate, measured peaks (probe), device-class sizing
    profile      a board's `device profile` peaks into a device class's sizing
    eager        EagerStage: the same stage in PyTorch eager (reference and baseline)
    explain      the sizing table a person reads
"""

from .compile import OptimizerConfig, compile_stage
from .explain import explain
from .export import ExportError, check_backends, check_output_folder, export_model

__all__ = ["ExportError", "OptimizerConfig", "check_backends", "check_output_folder", "compile_stage", "explain",
           "export_model"]
