"""Measure what the planner predicts: each rank's peak allocated tensor bytes in real steps.

This is the one planner module that needs torch.distributed: `measure_layout` runs on every rank
of a live process group (the gloo test harness, or torchrun on GPUs), trains a few steps of the
real model with the real DDP, optimizer and pipeline schedules, and returns the peak.

`AllocationTracker` counts live tensor storage bytes exactly, not RSS:

* CPU: a `TorchDispatchMode` sees every op (forward, the autograd engine's backward ops, the
  optimizer, collectives, factory functions) and registers each new storage it returns with its
  byte size; a ``weakref.finalize`` on the storage's Python object (torch preserves one object
  per storage) subtracts it when the storage dies, on whatever thread drops the last reference
  (gloo's workers release tensors held by finished collectives). Views share the storage and
  count once. The one place megalite resizes a live storage (ZeRO-2 releasing and re-making
  its gradient buckets) is reported through `resized`. Not seen: scratch memory inside a kernel
  or inside the communication backend (gloo's own buffers), which are not tensors of the
  program; the planner does not model them either.
* CUDA: ``torch.cuda.max_memory_allocated`` per window (reset at each mark).
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Optional
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _StorageCounter(TorchDispatchMode):
    def __init__(self, tracker: AllocationTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        stack = [out]
        while stack:
            item = stack.pop()
            if isinstance(item, (tuple, list)):
                stack.extend(item)
            elif isinstance(item, torch.Tensor) and item.device.type == "cpu":
                self.tracker.see(item.untyped_storage())
        return out


class AllocationTracker:
    """Live and peak tensor bytes of this process, per window between marks."""

    def __init__(self, device: torch.device):
        self.device = device
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}
        self.live = 0
        self._peak = 0
        self._peaks: list[int] = []
        self._marked = False
        self._mode: Optional[_StorageCounter] = None

    # -- CPU bookkeeping ------------------------------------------------------------------------
    def see(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._sizes:
            return
        size = storage.nbytes()
        with self._lock:
            self._sizes[key] = size
            self.live += size
            self._peak = max(self._peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            self.live -= self._sizes.pop(key, 0)

    def resized(self, storage: torch.UntypedStorage) -> None:
        """`storage` changed size in place (``UntypedStorage.resize_``)."""
        key = id(storage)
        if key not in self._sizes:
            self.see(storage)
            return
        with self._lock:
            self.live += storage.nbytes() - self._sizes[key]
            self._sizes[key] = storage.nbytes()
            self._peak = max(self._peak, self.live)

    # -- windows --------------------------------------------------------------------------------
    def __enter__(self) -> AllocationTracker:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        else:
            self._mode = _StorageCounter(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
        self._close_window()

    def _current_peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated(self.device))
        return self._peak

    def _close_window(self) -> None:
        if self._marked:
            self._peaks.append(self._current_peak())
            self._marked = False

    def mark(self) -> None:
        """Close the current window (if any) and open a new one."""
        self._close_window()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with self._lock:
                self._peak = self.live
        self._marked = True

    def window_peaks(self) -> list[int]:
        """Peak live bytes of each window, in order."""
        return list(self._peaks)


@dataclass
class MeasureSpec:
    """One layout and model to train (tiny, for gloo): every field maps to a training flag."""

    tp: int = 1
    pp: int = 1
    vp_layers: Optional[int] = None  # --num-layers-per-virtual-pipeline-stage
    sequence_parallel: bool = False
    zero_stage: int = 0
    recompute: str = "none"
    micro_batch_size: int = 2
    num_microbatches: int = 1
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    seq_length: int = 64
    vocab_size: int = 512
    swiglu: bool = False
    rope: bool = False
    rmsnorm: bool = False
    untie: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    bf16: bool = False
    bucket_size: Optional[int] = None
    steps: int = 3
    timed_steps: int = 0
    cp: int = 1  # --context-parallel-size
    cp_comm_type: str = "p2p"
    num_experts: Optional[int] = None  # --num-experts (MoE)
    topk: int = 2  # --moe-router-topk
    ep: int = 1  # --expert-model-parallel-size
    etp: Optional[int] = None  # --expert-tensor-parallel-size (None: TP)
    dispatcher: str = "alltoall"  # --moe-token-dispatcher-type
    moe_ffn_hidden_size: Optional[int] = None
    shared_expert_size: Optional[int] = None  # --moe-shared-expert-intermediate-size
    moe_layer_freq: int = 1

    @property
    def name(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.vp_layers:
            parts.append(f"vpl{self.vp_layers}")
        if self.sequence_parallel:
            parts.append("sp")
        parts += [f"z{self.zero_stage}", self.recompute[:3], f"m{self.num_microbatches}"]
        parts.append(f"b{self.micro_batch_size}")
        for flag in ("swiglu", "rope", "rmsnorm", "untie", "bf16"):
            if getattr(self, flag):
                parts.append(flag)
        if self.num_query_groups:
            parts.append(f"gqa{self.num_query_groups}")
        if self.hidden_dropout or self.attention_dropout:
            parts.append("drop")
        if self.cp > 1:
            parts.append(f"cp{self.cp}{self.cp_comm_type}")
        if self.num_experts:
            parts.append(f"moe{self.num_experts}k{self.topk}-ep{self.ep}")
            if self.etp is not None:
                parts.append(f"etp{self.etp}")
            parts.append(self.dispatcher[:6])
            if self.shared_expert_size:
                parts.append(f"shared{self.shared_expert_size}")
            if self.moe_layer_freq > 1:
                parts.append(f"freq{self.moe_layer_freq}")
        return "-".join(parts)

    def moe_config(self):
        """The MoE settings (None for a dense model)."""
        from megalite.moe import MoEConfig

        if not self.num_experts:
            return None
        return MoEConfig(
            num_experts=self.num_experts,
            moe_router_topk=self.topk,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
            moe_token_dispatcher_type=self.dispatcher,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=self.shared_expert_size,
            moe_layer_freq=self.moe_layer_freq,
        )

    def model_config(self):
        from megalite.model.config import GPTConfig

        return GPTConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            vocab_size=self.vocab_size,
            seq_length=self.seq_length,
            normalization="RMSNorm" if self.rmsnorm else "LayerNorm",
            swiglu=self.swiglu,
            position_embedding_type="rope" if self.rope else "learned_absolute",
            untie_embeddings_and_output_weights=self.untie,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            sequence_parallel=self.sequence_parallel and self.tp > 1,
            recompute_granularity=self.recompute,
            params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            num_layers_per_virtual_pipeline_stage=self.vp_layers,
            context_parallel_size=self.cp,
            cp_comm_type=self.cp_comm_type,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def measure_layout(spec: MeasureSpec, seed: int = 1234) -> dict:
    """Train `spec` on this rank (torch.distributed must be up); its peak bytes and step time.

    Returns ``{"rank", "pp_rank", "tp_rank", "dp_rank", "peak_bytes", "step_time_s"}``; the peak
    covers the training steps (model building excluded), step time the `timed_steps` after them.
    """
    import functools

    import torch.distributed as dist

    from megalite import parallel_state as ps
    from megalite.context_parallel import split_batch
    from megalite.data_parallel.ddp import DistributedDataParallel
    from megalite.data_parallel.finalize import finalize_model_grads
    from megalite.data_parallel.optimizer import OptimizerConfig, build_optimizer
    from megalite.model.gpt import build_model, pipeline_tensor_shape
    from megalite.pipeline_parallel import get_forward_backward_func
    from megalite.tensor_parallel.random import model_parallel_manual_seed

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )
    config = spec.model_config()
    vp = config.virtual_pipeline_size if spec.vp_layers else None
    ps.initialize_model_parallel(
        spec.tp, spec.pp, virtual_pipeline_model_parallel_size=vp, context_parallel_size=spec.cp,
        expert_model_parallel_size=spec.ep, expert_tensor_parallel_size=spec.etp,
    )  # fmt: skip
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    cp_rank = ps.get_context_parallel_rank()
    model_parallel_manual_seed(seed + 7919 * cp_rank, tp_rank, pp_rank)  # the trainer's seeds
    b, s, m = spec.micro_batch_size, spec.seq_length, spec.num_microbatches

    def batches():
        """Micro-batches made as they are read (the trainer's iterator), ids [b, s + 1]."""
        gen = torch.Generator().manual_seed(seed + ps.get_data_parallel_rank())
        for _ in range(m):
            tokens = torch.randint(0, spec.vocab_size, (b, s + 1), generator=gen).to(device)
            batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}
            # CP: each rank keeps its load-balanced part of every sequence (the trainer's split)
            yield split_batch(batch, spec.cp, cp_rank) if spec.cp > 1 else batch

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        inner = getattr(model, "module", model)
        out = model(
            batch["tokens"] if inner.pre_process else None,
            batch["labels"] if inner.post_process else None,
        )
        return out, lambda t: (t.float().mean(), {"lm_loss": t.float().mean().detach()})

    from megalite.data_parallel.ddp import Bucket

    def report_resize(method):
        def wrapped(bucket):
            method(bucket)
            tracker.resized(bucket.data.untyped_storage())

        return wrapped

    resize_hooks = [
        mock.patch.object(Bucket, name, report_resize(getattr(Bucket, name)))
        for name in ("materialize", "release")
    ]
    with AllocationTracker(device) as tracker, resize_hooks[0], resize_hooks[1]:
        chunks = build_model(config, seed, device=device, moe=spec.moe_config())
        # As the trainer's engine: gradients reduced (and ZeRO-sharded) over DP x CP, expert
        # gradients over expert-DP.
        chunks = [
            DistributedDataParallel(
                c, ps.get_data_parallel_group(with_context_parallel=True), spec.bucket_size,
                False, spec.zero_stage,
                expert_data_parallel_group=ps.get_expert_data_parallel_group(),
            )
            for c in chunks
        ]  # fmt: skip
        groups = ps.get_model_parallel_groups()
        optimizer = build_optimizer(
            OptimizerConfig(lr=1e-4, zero_stage=spec.zero_stage, bf16=spec.bf16), chunks, groups
        )
        finalize = functools.partial(finalize_model_grads, groups=groups)
        fb = get_forward_backward_func(spec.pp, len(chunks))
        shape = pipeline_tensor_shape(config, b)

        def step() -> None:
            optimizer.zero_grad()
            if len(chunks) > 1:  # interleaved: every chunk reads the same list (the trainer's)
                every = list(batches())
                data = [iter(every) for _ in chunks]
            else:
                data = batches()
            fb(
                forward_step, data, chunks if len(chunks) > 1 else chunks[0], m,
                tensor_shape=shape, dtype=config.params_dtype,
                no_sync_func=[c.no_sync for c in chunks],
                finalize_model_grads_func=finalize,
            )  # fmt: skip
            optimizer.step()

        for _ in range(spec.steps):
            dist.barrier()
            tracker.mark()
            step()
    # Step 1 creates the Adam state: the steady state is steps 2.. and their largest peak.
    per_step = tracker.window_peaks()
    peak = max(per_step[1:] or per_step)
    step_time = None
    if spec.timed_steps:
        step()  # warm, outside the tracker
        times = []
        for _ in range(spec.timed_steps):
            dist.barrier()
            start = time.perf_counter()
            step()
            dist.barrier()
            times.append(time.perf_counter() - start)
        # The fastest step: the least disturbed by other work on a shared machine.
        step_time = min(times)
    return {
        "rank": dist.get_rank(),
        "pp_rank": pp_rank,
        "tp_rank": tp_rank,
        "dp_rank": ps.get_data_parallel_rank(),
        "peak_bytes": peak,
        "step_peaks": per_step,
        "step_time_s": step_time,
    }
