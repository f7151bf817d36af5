"""Server side: torch -> ONNX -> ONNX Runtime training artifacts, sized to device memory."""

from .compile import OptimizerConfig, compile_stage
from .explain import explain
from .export import ExportError, check_output_folder, export_model

__all__ = ["ExportError", "OptimizerConfig", "check_output_folder", "compile_stage", "explain", "export_model"]
