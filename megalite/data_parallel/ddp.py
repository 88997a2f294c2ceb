"""Data-parallel wrapper: gradients packed into contiguous fp32 buckets, reduced over the DP group.

Every parameter that requires a gradient gets ``p.main_grad``: an fp32 view into one bucket.
A post-accumulate-grad hook adds ``p.grad`` into ``p.main_grad`` and frees ``p.grad``, so
gradient accumulation over micro-batches happens in fp32 whatever the model dtype (bf16/fp16).

Reduction is an average over the data-parallel group handed in (parallel_state's, never the
world): each bucket is divided by the DP size and then

- ZeRO 0: all-reduced; every rank holds the whole averaged gradient;
- ZeRO 1: reduce-scattered; rank ``d`` holds the averaged values of shard ``d`` of every bucket
  (the rest of its bucket keeps local, unreduced values and must not be read);
- ZeRO 2: reduce-scattered at the end of *every* backward pass and accumulated into a persistent
  fp32 shard (``bucket.grad_shard``, 1/DP of the bucket); the full bucket's storage is then
  released until the next backward needs it. As in DeepSpeed stage 2, gradient accumulation
  therefore reduces once per micro-batch: memory is traded for communication, and `no_sync`
  has no effect on these buckets.

Buckets are filled in reverse parameter order (roughly the order backward produces gradients).
With ``overlap_grad_reduce`` a bucket's reduction is launched (async) by the hook of the last of
its parameters, so communication overlaps the rest of the backward pass; otherwise everything
is launched by `finish_grad_sync`. A gradient that arrives for a bucket already launched in
this window (a micro-batch accumulated outside `no_sync`, or a schedule that leaves `no_sync`
for a chunk that still has micro-batches to go) *reopens* it:
the reduction is waited for and the new gradient is reduced on top of it at the next launch.
Averaging is linear, so the result is exact; only communication is repeated.

Parameters whose gradients need a model-parallel all-reduce first (``sequence_parallel`` norm
weights, ``shared_embedding`` tied embeddings; see docs/CONTRACTS.md) live in separate
*deferred* buckets that are reduced only by `finish_grad_sync`, after
`megalite.data_parallel.finalize.finalize_model_grads` has summed them over TP / the embedding
group. The two sums commute, so this is exact for every ZeRO stage.

Expert parameters of an MoE layer (``allreduce = False``, Megatron's tag) live in buckets of
their own, averaged over the *expert*-data-parallel group (`expert_data_parallel_group`: the
ranks holding the same expert shard) instead of DP; each bucket carries the group it is
reduced over, so ZeRO shards expert buckets over expert-DP. The sum is still divided by the DP
size (Megatron's rule): an expert's local gradient already sums the tokens of its whole EP
group, so the sum over expert-DP covers every DP replica's tokens once.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Optional

import torch
import torch.distributed as dist

DEFAULT_BUCKET_SIZE = 40_000_000  # elements, as Megatron's --ddp-bucket-size default

# torch 2.13 renamed the flat-tensor collectives; older torch (>= 2.3 supported) has the old names.
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_expert_param(param: torch.nn.Parameter) -> bool:
    """An MoE expert weight: reduced over expert-DP, not DP."""
    return not getattr(param, "allreduce", True)


def needs_model_parallel_reduction(param: torch.nn.Parameter) -> bool:
    """True for parameters whose gradient must be summed over TP or the embedding group."""
    return bool(getattr(param, "sequence_parallel", False)) or bool(
        getattr(param, "shared_embedding", False)
    )


class Bucket:
    """A contiguous fp32 gradient buffer for a few parameters, and its reduction state.

    ``data`` has ``numel`` elements (padded to a multiple of the DP size so that every rank gets an
    equal shard); parameter ``p`` occupies ``data[ranges[p][0]:ranges[p][1]]``. Rank ``d`` owns
    ``data[shard[0]:shard[1]]`` under ZeRO 1/2. `group` is the group it is averaged over (DP,
    or expert-DP for expert parameters), of `dp_size` ranks; the sum is divided by `divisor`.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        dp_size: int,
        dp_rank: int,
        zero_stage: int,
        deferred: bool,
        device: torch.device,
        reduce_dtype: torch.dtype = torch.float32,
        group=None,
        divisor: Optional[int] = None,
    ):
        self.params = params
        self.reduce_dtype = reduce_dtype  # bf16: communicate in bf16, accumulate in fp32
        self.comm: Optional[torch.Tensor] = None
        self.group, self.dp_size = group, dp_size
        self.divisor = dp_size if divisor is None else divisor
        self.deferred = deferred
        self.zero_stage = zero_stage
        self.ranges: dict[torch.nn.Parameter, tuple[int, int]] = {}
        offset = 0
        for p in params:
            self.ranges[p] = (offset, offset + p.numel())
            offset += p.numel()
        self.numel = -(-offset // dp_size) * dp_size
        shard_size = self.numel // dp_size
        self.shard = (dp_rank * shard_size, (dp_rank + 1) * shard_size)
        self.data = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self._nbytes = self.data.untyped_storage().nbytes()
        self.grad_shard: Optional[torch.Tensor] = None
        if zero_stage == 2:
            self.grad_shard = torch.zeros(shard_size, dtype=torch.float32, device=device)
        for p in params:
            lo, hi = self.ranges[p]
            p.main_grad = self.data[lo:hi].view_as(p)
        self.pending: set[int] = {id(p) for p in params}
        self.work = None
        self.launched = False
        self.out: Optional[torch.Tensor] = None
        self.acc: Optional[torch.Tensor] = None  # ZeRO-1 reduced shard set aside by `reopen`

    # -- storage (ZeRO-2 releases the full buffer between reductions) -------------------------
    @property
    def materialized(self) -> bool:
        return self.data.untyped_storage().nbytes() > 0

    def materialize(self) -> None:
        """Re-allocate (zeroed) storage; every ``main_grad`` view sees it again."""
        if not self.materialized:
            self.data.untyped_storage().resize_(self._nbytes)
            self.data.zero_()

    def release(self) -> None:
        self.data.untyped_storage().resize_(0)

    # -- reduction ---------------------------------------------------------------------------
    def launch(self) -> None:
        """Start the (async) average of this bucket over its group."""
        group, dp_size = self.group, self.dp_size
        self.materialize()
        if self.divisor > 1:
            self.data.div_(self.divisor)
        low = self.reduce_dtype != self.data.dtype and dp_size > 1
        self.comm = self.data.to(self.reduce_dtype) if low else None
        send = self.comm if low else self.data
        if self.zero_stage == 0:
            self.out, self.work = None, None
            if dp_size > 1:
                self.work = dist.all_reduce(send, group=group, async_op=True)
        else:
            # A separate output buffer: reduce-scatter into a view of its own input is not
            # something every backend promises to support.
            size = self.shard[1] - self.shard[0]
            self.out = torch.empty(size, dtype=send.dtype, device=self.data.device)
            if dp_size > 1:
                self.work = reduce_scatter_flat(self.out, send, group=group, async_op=True)
            else:
                self.out.copy_(self.data)
                self.work = None
        self.pending = set()  # launched: nothing may be added until the window is reset
        # Launched once per window: a bucket with nothing to wait for (one rank, ZeRO 0) must
        # not be divided again by a second launch.
        self.launched = True

    def wait(self) -> None:
        """Finish a launched reduction and put the result where the optimizer reads it."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        if self.comm is not None and self.zero_stage == 0:
            self.data.copy_(self.comm)
        self.comm = None
        if self.out is not None:
            lo, hi = self.shard
            if self.zero_stage == 1:
                self.data[lo:hi].copy_(self.out)
                if self.acc is not None:
                    self.data[lo:hi].add_(self.acc)
                    self.acc = None
            else:
                self.grad_shard.add_(self.out)
                self.release()
            self.out = None

    def reopen(self) -> None:
        """Accept more gradient after a launch: finish it, then reduce new grads on top.

        ZeRO 0: the bucket now holds the DP average A on every rank; averaging ``A + g_r`` over
        ranks gives ``A + mean(g)``, so plain accumulation is exact. ZeRO 1: only the owned
        shard holds A (the rest is this rank's unreduced gradient), so A is set aside and the
        buffer restarts from zero; `wait` adds A back after the next reduce-scatter.
        ZeRO 2 reduces into its persistent shard every backward anyway.
        """
        self.wait()
        if self.zero_stage == 1:
            lo, hi = self.shard
            acc = self.data[lo:hi].clone()
            self.data.zero_()
            self.acc = acc
        self.reset_window()

    def reset_window(self) -> None:
        self.launched = False
        self.pending = {id(p) for p in self.params}

    def shard_grad(self) -> torch.Tensor:
        """The rank's averaged gradient shard (ZeRO 1/2), valid after `finish_grad_sync`."""
        if self.zero_stage == 2:
            return self.grad_shard
        return self.data[self.shard[0] : self.shard[1]]


def _weak_grad_hook(ref: weakref.ref) -> Callable[[torch.nn.Parameter], None]:
    """A post-accumulate-grad hook that calls ``ref()._grad_hook`` while the wrapper lives."""

    def hook(param: torch.nn.Parameter) -> None:
        ddp = ref()
        if ddp is not None:
            ddp._grad_hook(param)

    return hook


class DistributedDataParallel(torch.nn.Module):
    """Wrap `module`; gradients land in ``p.main_grad`` and are averaged over `data_parallel_group`.

    Args:
        module: the model chunk (any ``nn.Module``; parameters may be fp32, bf16 or fp16).
        data_parallel_group: the DP process group (``parallel_state.get_data_parallel_group()``);
            None means a single replica (no communication).
        bucket_size: elements per bucket (``--ddp-bucket-size``); None -> 40M.
        overlap_grad_reduce: launch each bucket's reduction from backward hooks as it fills.
        zero_stage: 0 all-reduce, 1 reduce-scatter, 2 reduce-scatter + keep only the shard.
        reduce_dtype: dtype of the reduction's messages (``--grad-reduce-in-bf16``: bf16);
            gradients are accumulated and handed to the optimizer in fp32 either way.
        expert_data_parallel_group: where expert parameters (``allreduce = False``) are
            averaged (``parallel_state.get_expert_data_parallel_group()``); None: one replica.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        data_parallel_group=None,
        bucket_size: Optional[int] = None,
        overlap_grad_reduce: bool = False,
        zero_stage: int = 0,
        reduce_dtype: torch.dtype = torch.float32,
        expert_data_parallel_group=None,
    ):
        super().__init__()
        self.reduce_dtype = reduce_dtype
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {zero_stage}")
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1 element, got {bucket_size}")
        self.module = module
        self.data_parallel_group = data_parallel_group
        self.dp_size = dist.get_world_size(data_parallel_group) if data_parallel_group else 1
        self.dp_rank = dist.get_rank(data_parallel_group) if data_parallel_group else 0
        self.expert_data_parallel_group = expert_data_parallel_group
        self.edp_size = (
            dist.get_world_size(expert_data_parallel_group) if expert_data_parallel_group else 1
        )
        self.edp_rank = (
            dist.get_rank(expert_data_parallel_group) if expert_data_parallel_group else 0
        )
        self.bucket_size = bucket_size or DEFAULT_BUCKET_SIZE
        self.overlap_grad_reduce = overlap_grad_reduce
        self.zero_stage = zero_stage
        self._sync_enabled = True
        self._callback_queued = False
        self.buckets = self._build_buckets()
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        # The hook holds this wrapper weakly: a bound method stored on each parameter would close
        # a cycle (parameter -> hook -> wrapper -> module -> parameter) through autograd's C++
        # side, which Python's collector cannot see, so the model, its buckets and every process
        # group they hold would outlive the run (one more set per `pretrain()` in a process).
        hook = _weak_grad_hook(weakref.ref(self))
        self._hooks = [
            p.register_post_accumulate_grad_hook(hook) for b in self.buckets for p in b.params
        ]

    def _build_buckets(self) -> list[Bucket]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        device = params[0].device if params else torch.device("cpu")
        buckets = []
        for expert in (False, True):
            for deferred in (False, True):
                current, size = [], 0
                for p in reversed(params):
                    if (
                        needs_model_parallel_reduction(p) != deferred
                        or is_expert_param(p) != expert
                    ):
                        continue
                    current.append(p)
                    size += p.numel()
                    if size >= self.bucket_size:
                        buckets.append(self._bucket(current, deferred, device, expert))
                        current, size = [], 0
                if current:
                    buckets.append(self._bucket(current, deferred, device, expert))
        return buckets

    def _bucket(self, params, deferred, device, expert: bool = False) -> Bucket:
        if expert:
            group, size, rank = self.expert_data_parallel_group, self.edp_size, self.edp_rank
        else:
            group, size, rank = self.data_parallel_group, self.dp_size, self.dp_rank
        return Bucket(
            params, size, rank, self.zero_stage, deferred, device, self.reduce_dtype, group,
            self.dp_size,
        )  # fmt: skip

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # -- backward hooks -----------------------------------------------------------------------
    def _grad_hook(self, param: torch.nn.Parameter) -> None:
        bucket = self._bucket_of[id(param)]
        if param.grad is None:
            return
        # Reduce-at-end-of-backward is what lets ZeRO-2 free full buffers between micro-batches.
        if self.zero_stage == 2 and not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if id(param) not in bucket.pending:
            bucket.reopen()
        bucket.materialize()
        param.main_grad.add_(param.grad)
        param.grad = None
        if bucket.deferred or not self.overlap_grad_reduce:
            return  # reduced by finish_grad_sync (or, ZeRO-2, at the end of this backward)
        if self._sync_enabled or self.zero_stage == 2:
            bucket.pending.discard(id(param))
            if not bucket.pending:
                bucket.launch()

    def _end_of_backward(self) -> None:
        """ZeRO-2: reduce-scatter every non-deferred bucket and keep only the shard."""
        self._callback_queued = False
        for b in self.buckets:
            if b.deferred:
                continue
            if not b.launched and b.materialized:
                b.launch()
        for b in self.buckets:
            if not b.deferred:
                b.wait()
                b.reset_window()

    # -- the public protocol used by schedules and finalize_model_grads ----------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without reducing them (all micro-batches but the last)."""
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = True

    def start_grad_sync(self) -> None:
        """Launch every bucket whose reduction has not started yet."""
        for b in self.buckets:
            if not b.launched and (b.zero_stage != 2 or b.materialized):
                b.launch()

    def finish_grad_sync(self) -> None:
        """Launch what is left, wait for every reduction; grads are then averaged over DP."""
        self.start_grad_sync()
        for b in self.buckets:
            b.wait()
            b.reset_window()

    def zero_grad_buffer(self) -> None:
        """Zero every gradient (buffers, ZeRO-2 shards) and open a new sync window."""
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
            b.work, b.out, b.acc = None, None, None
            if b.materialized:
                b.data.zero_()
            if b.grad_shard is not None:
                b.grad_shard.zero_()
            b.reset_window()
        for b in self.buckets:
            for p in b.params:
                p.grad = None
        self._callback_queued = False

    def broadcast_params(self) -> None:
        """Copy DP-rank 0's parameters to the other replicas (for non-deterministic inits);
        expert parameters from expert-DP rank 0."""
        for b in self.buckets:
            if b.dp_size == 1:
                continue
            src = dist.get_global_rank(b.group, 0)
            for p in b.params:
                dist.broadcast(p.data, src=src, group=b.group)
        if self.dp_size > 1:  # frozen parameters are in no bucket
            src = dist.get_global_rank(self.data_parallel_group, 0)
            for p in self.module.parameters():
                if id(p) not in self._bucket_of:
                    dist.broadcast(p.data, src=src, group=self.data_parallel_group)

    # Checkpoints hold the bare module's names (no "module." prefix).
    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)
