"""Tensor parallelism: autograd collectives, column/row-parallel linears, vocab-parallel
embedding and cross-entropy, and the RNG tracker with its activation-checkpoint helper.

Public names are re-exported here: ``from megalite.tensor_parallel import RowParallelLinear``.
"""

from megalite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megalite.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megalite.tensor_parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    checkpoint,
    get_rng_tracker,
    model_parallel_manual_seed,
)
from megalite.tensor_parallel.utils import (
    divide,
    ensure_divisibility,
    shard_tensor,
    vocab_range,
    vocab_size_with_padding,
)

__all__ = [
    "checkpoint",
    "ColumnParallelLinear",
    "copy_to_tensor_model_parallel_region",
    "divide",
    "ensure_divisibility",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "get_rng_tracker",
    "model_parallel_manual_seed",
    "MODEL_PARALLEL_RNG",
    "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "RNGStatesTracker",
    "RowParallelLinear",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "set_tensor_model_parallel_attributes",
    "shard_tensor",
    "vocab_parallel_cross_entropy",
    "vocab_range",
    "vocab_size_with_padding",
    "VocabParallelEmbedding",
]
