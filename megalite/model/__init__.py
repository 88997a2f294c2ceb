"""The GPT model: config, transformer layer from tensor-parallel pieces, pipeline chunks."""

from megalite.model.config import GPTConfig
from megalite.model.flops import num_floating_point_operations
from megalite.model.gpt import GPTModel, build_model, pipeline_tensor_shape
from megalite.model.grads import allreduce_embedding_grads, allreduce_sequence_parallel_grads

__all__ = [
    "GPTConfig",
    "GPTModel",
    "allreduce_embedding_grads",
    "allreduce_sequence_parallel_grads",
    "build_model",
    "num_floating_point_operations",
    "pipeline_tensor_shape",
]
