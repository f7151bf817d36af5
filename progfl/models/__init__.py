"""Block-structured models (the zoo or your own nn.Sequential), the stages progressive training cuts them into, and
the width-scaled sub-models of the HeteroFL-style baselines."""

from .base import DEFAULT_OUTPUT_MODULE, OUTPUT_MODULES, BlockModel, Classifier, basic_layer
from .sequential import from_sequential
from .stages import WIDTH_DIVISORS, NeuLiteWeights, StageSpec, build_stage, default_stages, parse_stage_name
from .width import sliced_axes, width_model
from .zoo import ZOO, build_model, load_model

__all__ = [
    "DEFAULT_OUTPUT_MODULE",
    "OUTPUT_MODULES",
    "BlockModel",
    "Classifier",
    "NeuLiteWeights",
    "StageSpec",
    "WIDTH_DIVISORS",
    "ZOO",
    "basic_layer",
    "build_model",
    "build_stage",
    "default_stages",
    "from_sequential",
    "load_model",
    "parse_stage_name",
    "sliced_axes",
    "width_model",
]
