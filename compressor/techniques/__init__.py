"""One handler per quantization technique, composed by the `quantize` pass (and reused by `allocate_bits` and
`lowrank` to predict what the pass will make of a weight).

Each handler takes a typed config of its own (`RtnConfig`, `GptqConfig`, `AwqConfig`, built from the recipe's
`quantize` section; the low-rank fit takes the `lowrank` section), the weights and the statistics it needs, and
calls the pure numerics of `compressor.quant`:

- `data_free.py`: round-to-nearest (INT) and FP8, which need no statistics;
- `gptq.py`: GPTQ, given the input Gram matrix;
- `awq.py`: activation-aware scaling, given the input statistics, folded into the module that feeds the input;
- `lowrank.py`: the low-rank correction of a layer's quantization error, given the input Gram matrix.
"""

from .awq import AwqConfig, scale_inputs
from .data_free import RtnConfig, quantize_data_free
from .gptq import GptqConfig, gptq_candidates, solve_gptq, solve_gptq_diagnosed
from .lowrank import fit_compensation

__all__ = [
    "AwqConfig",
    "GptqConfig",
    "RtnConfig",
    "fit_compensation",
    "gptq_candidates",
    "quantize_data_free",
    "scale_inputs",
    "solve_gptq",
    "solve_gptq_diagnosed",
]
