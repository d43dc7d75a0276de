"""sepconv: depthwise separable convolutions for PyTorch — layers, exact costs, conversion, fast kernels.

>>> import torch, sepconv
>>> layer = sepconv.SeparableConv2d(10, 32, 3)
>>> sepconv.cost(layer, (5, 10, 50, 50)).macs
4723200
"""

__version__ = "0.1.0"  # before the imports: cpu_strategy_file reads it when it loads SEPCONV_CPU_STRATEGY_FILE

from sepconv.accelerate import Acceleration, FusedSeparableConv2d, accelerate
from sepconv.analyze import Report, analyze
from sepconv.convert import ConversionReport, convert
from sepconv.cost import Comparison, Cost, compare, cost
from sepconv.cpu_allocator import freed_memory_kept, huge_pages_in_use, keep_freed_memory
from sepconv.cpu_conversions import compiled_conversions_in_use, use_compiled_conversions
from sepconv.cpu_layout import run_channels_last
from sepconv.cpu_strategy import (
    clear_cpu_strategy_cache,
    cpu_strategy_decisions,
    cpu_strategy_measurements,
    get_cpu_strategy,
    set_cpu_strategy,
    use_cpu_strategy,
)
from sepconv.cpu_strategy_file import load_cpu_strategy_decisions, save_cpu_strategy_decisions
from sepconv.cpu_tune import tune_cpu_strategy
from sepconv.decompose import decompose_conv
from sepconv.layers import (
    DepthwiseConv1d,
    DepthwiseConv2d,
    DepthwiseConv3d,
    PointwiseConv1d,
    PointwiseConv2d,
    PointwiseConv3d,
    SeparableConv1d,
    SeparableConv2d,
    SeparableConv3d,
)
from sepconv.train import Batches, distillation_loss, evaluate, finetune, fit

__all__ = [
    "Acceleration",
    "Batches",
    "Comparison",
    "ConversionReport",
    "Cost",
    "DepthwiseConv1d",
    "DepthwiseConv2d",
    "DepthwiseConv3d",
    "FusedSeparableConv2d",
    "PointwiseConv1d",
    "PointwiseConv2d",
    "PointwiseConv3d",
    "Report",
    "SeparableConv1d",
    "SeparableConv2d",
    "SeparableConv3d",
    "accelerate",
    "analyze",
    "clear_cpu_strategy_cache",
    "compare",
    "compiled_conversions_in_use",
    "convert",
    "cost",
    "cpu_strategy_decisions",
    "cpu_strategy_measurements",
    "decompose_conv",
    "distillation_loss",
    "evaluate",
    "finetune",
    "fit",
    "freed_memory_kept",
    "get_cpu_strategy",
    "huge_pages_in_use",
    "keep_freed_memory",
    "load_cpu_strategy_decisions",
    "run_channels_last",
    "save_cpu_strategy_decisions",
    "set_cpu_strategy",
    "tune_cpu_strategy",
    "use_compiled_conversions",
    "use_cpu_strategy",
]
