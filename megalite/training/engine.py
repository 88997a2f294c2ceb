"""Engines: one training step, one eval step and the state to save or load, behind one interface.

`MegaliteEngine` runs megalite's own stack (DDP + ZeRO-1/2 optimizer + pipeline schedules);
`DeepSpeedEngine` runs DeepSpeed's. The trainer picks one in `build_engine` and never branches
on DeepSpeed again.

A step takes a list of micro-batch iterators (one per model chunk) and returns this step's
mean loss over the global batch (on the last pipeline stage; None elsewhere), whether the
optimizer applied the update, and the global gradient norm.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.data_parallel import (
    DistributedDataParallel,
    build_optimizer,
    finalize_model_grads,
)
from megalite.model.gpt import pipeline_tensor_shape
from megalite.moe import training as moe_training
from megalite.pipeline_parallel import get_forward_backward_func
from megalite.training import memory
from megalite.training.config import RunConfig

StepResult = tuple[Optional[float], bool, Optional[float]]


def _forward_step(data_iterator, model):
    """The schedules' forward step: the chunk reads tokens on the first stage, labels on the last,
    and the loss is the mean over the micro-batch's tokens."""
    batch = next(data_iterator)
    inner = getattr(model, "module", model)
    out = model(
        batch["tokens"] if inner.pre_process else None,
        batch["labels"] if inner.post_process else None,
    )

    def loss_func(per_token: torch.Tensor):
        loss = per_token.float().mean()
        return loss, {"lm_loss": loss.detach()}

    return out, loss_func


def mean_loss(outputs: list[dict], device, dp_group, dp: int) -> Optional[float]:
    """Mean lm loss over a global batch (every micro-batch, every DP rank); last stage only.

    With context parallelism `dp_group` is DP x CP and `dp` its size: each CP rank's loss is the
    mean over its equal share of every sequence, so their mean is the mean over every token."""
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    loss = torch.stack([o["lm_loss"].float() for o in outputs]).mean().to(device)
    dist.all_reduce(loss, group=dp_group)
    return loss.item() / dp


class Engine:
    """The interface; see the module docstring."""

    chunks: list[torch.nn.Module]

    def set_lr(self, lr: float, decoupled_lr: Optional[float]) -> None:
        raise NotImplementedError

    def train_step(self, micro: list, num_microbatches: int) -> StepResult:
        raise NotImplementedError

    def eval_step(self, micro: list, num_microbatches: int) -> Optional[float]:
        raise NotImplementedError

    def model_state(self) -> dict:
        """{"chunk0": state_dict, ...} of this rank's model chunks."""
        return {f"chunk{i}": self.unwrap(c).state_dict() for i, c in enumerate(self.chunks)}

    def load_model_state(self, state: dict) -> None:
        for i, chunk in enumerate(self.chunks):
            self.unwrap(chunk).load_state_dict(state[f"chunk{i}"])

    @staticmethod
    def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
        return getattr(chunk, "module", chunk)

    optimizer_state: Optional[Callable[[], dict]] = None
    optimizer_sharded: bool = False
    empty_unused_memory_level: int = 0
    # --log-num-zeros-in-grad: zero gradient entries of the last step (None: not counted)
    num_zeros_in_grad: Optional[int] = None
    device: torch.device

    def _empty_cache(self, level: int) -> None:
        """--empty-unused-memory-level: at a point of `level` (1: after a forward-backward or an
        eval iteration; 2: also after the optimizer step) hand cached device memory back."""
        if self.empty_unused_memory_level >= level:
            memory.release_cached_memory(self.device)

    def load_optimizer_state(self, state: dict) -> None:
        raise NotImplementedError

    def loss_scale(self) -> Optional[float]:
        return None

    def close(self) -> None:
        """Release what the engine holds beyond Python's reach (hooks, DeepSpeed's state), so
        the model and its process groups die with the run; safe to call twice."""

    def train(self, mode: bool = True) -> None:
        for c in self.chunks:
            c.train(mode)


class MegaliteEngine(Engine):
    """DDP (grad buckets, ZeRO reduce-scatter) + megalite's optimizer + pipeline schedules."""

    def __init__(self, cfg: RunConfig, chunks: list[torch.nn.Module], device):
        p, o = cfg.parallel, cfg.optimizer
        reduce_dtype = torch.bfloat16 if p.grad_reduce_in_bf16 else torch.float32
        # Gradients are reduced (and ZeRO shards) over DP x CP: CP ranks hold the same weights
        # and each saw part of every sequence (their per-token means average to the global one).
        self.dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.chunks = [
            DistributedDataParallel(
                c,
                self.dp_group,
                p.ddp_bucket_size,
                p.overlap_grad_reduce,
                o.zero_stage,
                reduce_dtype=reduce_dtype,
                expert_data_parallel_group=ps.get_expert_data_parallel_group(),
            )
            for c in chunks
        ]
        self.moe_metrics: dict[str, float] = {}
        groups = ps.get_model_parallel_groups()
        self.optimizer = build_optimizer(o, self.chunks, groups)
        self.optimizer_state = self.optimizer.state_dict
        self.optimizer_sharded = o.zero_stage > 0
        self.finalize = functools.partial(finalize_model_grads, groups=groups)
        model = cfg.model_config(vocab_size=1)
        self.forward_backward = get_forward_backward_func(
            model.pipeline_model_parallel_size, model.virtual_pipeline_size
        )
        self.tensor_shape = pipeline_tensor_shape(model, cfg.training.micro_batch_size)
        self.dtype = cfg.optimizer.params_dtype
        self.device = device
        self.dp = ps.get_data_parallel_world_size(with_context_parallel=True)
        self.empty_unused_memory_level = cfg.training.empty_unused_memory_level

    def _run(self, micro: list, num_microbatches: int, forward_only: bool) -> list[dict]:
        extra: dict[str, Any] = {}
        if not forward_only:
            extra = dict(
                no_sync_func=[c.no_sync for c in self.chunks],
                finalize_model_grads_func=self.finalize,
                grad_scale_func=self.optimizer.scale_loss,
            )
        return self.forward_backward(
            _forward_step,
            micro if len(self.chunks) > 1 else micro[0],
            self.chunks,
            num_microbatches,
            tensor_shape=self.tensor_shape,
            dtype=self.dtype,
            forward_only=forward_only,
            **extra,
        )

    def set_lr(self, lr: float, decoupled_lr: Optional[float]) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = decoupled_lr if group.get("decoupled_lr") else lr

    def train_step(self, micro: list, num_microbatches: int) -> StepResult:
        self.optimizer.zero_grad()
        # MoE aux losses weigh like one micro-batch of the (loss-scaled) LM loss.
        moe_training.before_step(
            self.chunks,
            num_microbatches,
            self.optimizer.get_loss_scale(),
            ps.get_context_parallel_world_size(),
        )
        outputs = self._run(micro, num_microbatches, forward_only=False)
        self._empty_cache(1)
        updated, grad_norm, self.num_zeros_in_grad = self.optimizer.step()
        self._empty_cache(2)
        # Expert-bias update (aux-loss-free balancing) and this step's per-layer MoE metrics.
        self.moe_metrics = moe_training.after_step(
            self.chunks,
            ps.get_tensor_context_and_data_parallel_group(),
            update_bias=updated,
            dp_group=ps.get_data_parallel_group(),
        )
        loss = mean_loss(outputs, self.device, self.dp_group, self.dp)
        return loss, updated, grad_norm

    def eval_step(self, micro: list, num_microbatches: int) -> Optional[float]:
        outputs = self._run(micro, num_microbatches, forward_only=True)
        self._empty_cache(1)
        moe_training.reset_metrics(self.chunks)  # eval tokens are not part of the step's load
        return mean_loss(outputs, self.device, self.dp_group, self.dp)

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def loss_scale(self) -> Optional[float]:
        return self.optimizer.get_loss_scale()


class DeepSpeedEngine(Engine):
    """DeepSpeed's engine (ZeRO-1/2/3, offload) around megalite's TP model; PP = 1."""

    # DeepSpeed's own checkpoints need full unpickling: the trainer saves this engine through
    # `megalite.data_parallel.deepspeed_checkpoint` (megalite's per-parameter format) instead.
    optimizer_state = None

    def __init__(self, cfg: RunConfig, chunks: list[torch.nn.Module], device):
        from megalite.data_parallel.deepspeed_bridge import (
            deepspeed_config_for,
            initialize_deepspeed,
            load_deepspeed_config,
        )

        t, o = cfg.training, cfg.optimizer
        ds_config = deepspeed_config_for(
            load_deepspeed_config(cfg.parallel.deepspeed_config),
            t.micro_batch_size,
            t.global_batch_size,
            o,
        )
        self.engine = initialize_deepspeed(chunks[0], ds_config, o)
        self.chunks = chunks
        self.device, self.dp = device, ps.get_data_parallel_world_size()
        self.empty_unused_memory_level = t.empty_unused_memory_level

    def set_lr(self, lr: float, decoupled_lr: Optional[float]) -> None:
        # the --decoupled-lr groups (embedding, output layer) are marked by deepspeed_bridge
        for group in self.engine.optimizer.param_groups:
            group["lr"] = decoupled_lr if group.get("decoupled_lr") else lr

    def train_step(self, micro: list, num_microbatches: int) -> StepResult:
        outputs = []
        for i, batch in enumerate(micro[0]):
            loss = self.engine(batch["tokens"], batch["labels"]).float().mean()
            self.engine.backward(loss)
            if i == num_microbatches - 1:  # DeepSpeed's step() at the boundary is the update
                self._empty_cache(1)
            self.engine.step()
            outputs.append({"lm_loss": loss.detach()})
        self._empty_cache(2)
        norm = self.engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        loss = mean_loss(outputs, self.device, ps.get_data_parallel_group(), self.dp)
        return loss, self.engine.was_step_applied(), norm

    def load_optimizer_state(self, state: dict) -> None:
        from megalite.data_parallel.deepspeed_checkpoint import load_engine_optimizer

        load_engine_optimizer(self.engine, self.chunks[0], state)

    def close(self) -> None:
        # DeepSpeed's ZeRO optimizers keep gradient hooks on every parameter that reference the
        # engine; destroy() removes them (and is a no-op the second time).
        self.engine.destroy()

    def eval_step(self, micro: list, num_microbatches: int) -> Optional[float]:
        outputs = [
            {"lm_loss": self.engine(b["tokens"], b["labels"]).float().mean()} for b in micro[0]
        ]
        self._empty_cache(1)
        return mean_loss(outputs, self.device, ps.get_data_parallel_group(), self.dp)


def build_engine(cfg: RunConfig, chunks: list[torch.nn.Module], device) -> Engine:
    """The one place that chooses between megalite's stack and DeepSpeed's."""
    cls = DeepSpeedEngine if cfg.parallel.deepspeed else MegaliteEngine
    return cls(cfg, chunks, device)
