"""DDP + ZeRO composed with TP (megalite's TP layers, sequence parallel too) and a 2-stage pipeline.

The model is a tiny LM: vocab-parallel embedding -> column/row MLP (residual) -> LayerNorm ->
output layer tied to the embedding -> vocab-parallel cross-entropy. With PP=2 the first stage
holds embedding + MLP and the last stage norm + its own copy of the embedding (both tagged
``shared_embedding``), joined by a hand-made send/recv pipeline (one micro-batch at a time).
Every layout must give the parameters and grad norms of one process on the whole batch.
"""

import contextlib
import zlib

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.data_parallel import (
    DistributedDataParallel,
    OptimizerConfig,
    build_optimizer,
    finalize_model_grads,
    get_param_groups,
)
from megalite.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megalite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from tests.harness import run_distributed

V, H, F, S, GB, MICRO = 16, 8, 16, 4, 8, 2
LR, WD, CLIP = 1e-2, 0.1, 0.3


def init_method(name: str):
    """Deterministic per parameter name, whatever the layout (full weight filled in place)."""

    def fill(full: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        full.copy_(torch.randn(full.shape, generator=g) * 0.5)

    return fill


class TinyLM(nn.Module):
    """One pipeline stage (or the whole model when first and last)."""

    def __init__(self, tp_group, first=True, last=True, sp=False, dtype=torch.float32):
        super().__init__()
        self.first, self.last, self.tp_group = first, last, tp_group
        tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.sp = sp and tp > 1
        kw = dict(group=tp_group, params_dtype=dtype)
        # The last stage of a pipeline keeps its own copy of the (tied) embedding.
        self.embedding = VocabParallelEmbedding(
            V, H, init_method=init_method("emb"), reduce_scatter_embeddings=self.sp, **kw
        )
        if first:
            self.fc1 = ColumnParallelLinear(
                H, F, init_method=init_method("fc1"), sequence_parallel=self.sp, **kw
            )
            self.fc2 = RowParallelLinear(
                F, H, init_method=init_method("fc2"), sequence_parallel=self.sp, **kw
            )
        if last:
            self.norm = nn.LayerNorm(H, dtype=dtype)
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                self.norm.weight.copy_(1 + 0.2 * torch.randn(H, generator=g))
                self.norm.bias.copy_(0.2 * torch.randn(H, generator=g))
            for p in self.norm.parameters():
                p.sequence_parallel = self.sp
            self.head = ColumnParallelLinear(
                H, V, init_method=None, bias=False, skip_weight_param_allocation=True,
                sequence_parallel=self.sp, **kw,
            )  # fmt: skip
        if not (first and last):
            self.embedding.weight.shared_embedding = True

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """First stage: ids ``[s, b]``; else hidden ``[s(/tp), b, h]``. Returns hidden or loss."""
        if self.first:
            h = self.embedding(x)
            h = h + self.fc2(nn.functional.gelu(self.fc1(h)[0]))[0]
        else:
            h = x
        if not self.last:
            return h
        logits, _ = self.head(self.norm(h), weight=self.embedding.weight)
        return vocab_parallel_cross_entropy(logits.float(), labels, self.tp_group).mean()


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, V, (S, GB), generator=g)
    return ids, torch.randint(0, V, (S, GB), generator=g)


def serial_reference(steps: int):
    model = TinyLM(None)
    opt = torch.optim.AdamW(get_param_groups([model], WD), lr=LR)
    losses, norms = [], []
    for step in range(steps):
        loss = model(*global_batch(step))
        loss.backward()
        losses.append(loss.item())
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
    return model, losses, norms


def micro_batches(step: int):
    """This DP rank's columns of the global batch, split into MICRO micro-batches."""
    dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ids, labels = global_batch(step)
    per = GB // dp
    ids, labels = ids[:, d * per : (d + 1) * per], labels[:, d * per : (d + 1) * per]
    return list(zip(ids.chunk(MICRO, dim=1), labels.chunk(MICRO, dim=1)))


def pipeline_step(ddp, batches, grad_scale_func=None) -> float:
    """Forward + backward of every micro-batch through 2 (or 1) stages; mean loss on the last.

    `grad_scale_func` (fp16 loss scaling) multiplies each loss before its backward.
    """
    scale = grad_scale_func or (lambda loss: loss)
    pp = ps.get_pipeline_model_parallel_world_size()
    first = ps.is_pipeline_first_stage()
    tp = ps.get_tensor_model_parallel_world_size()
    total = 0.0
    for i, (ids, labels) in enumerate(batches):
        sync = i == len(batches) - 1
        with ddp.no_sync() if not sync else contextlib.nullcontext():
            if pp == 1:
                loss = ddp(ids, labels) / len(batches)
                scale(loss).backward()
                total += loss.item()
            elif first:
                h = ddp(ids, labels)
                dist.send(h.detach().contiguous(), ps.get_pipeline_model_parallel_next_rank())
                grad = torch.empty_like(h)
                dist.recv(grad, ps.get_pipeline_model_parallel_next_rank())
                h.backward(grad)
            else:
                s = S // tp if ddp.module.sp else S
                h = torch.empty(s, ids.shape[1], H, requires_grad=True)
                dist.recv(h.data, ps.get_pipeline_model_parallel_prev_rank())
                loss = ddp(h, labels) / len(batches)
                scale(loss).backward()
                total += loss.item()
                dist.send(h.grad, ps.get_pipeline_model_parallel_prev_rank())
    return total


def train_3d(tp, pp, zero, sp=False, steps=3, overlap=True, bucket_size=64, opt_kwargs=None):
    """Build this rank's stage, wrap it, train `steps` steps; (ddp, optimizer, losses, norms)."""
    ps.initialize_model_parallel(tp, pp)
    tp_group = ps.get_tensor_model_parallel_group()
    model = TinyLM(tp_group, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(), sp)
    ddp = DistributedDataParallel(
        model, ps.get_data_parallel_group(), bucket_size, overlap, zero_stage=zero
    )
    kw = dict(lr=LR, weight_decay=WD, clip_grad=CLIP, zero_stage=zero, **(opt_kwargs or {}))
    opt = build_optimizer(OptimizerConfig(**kw), [ddp], ps.get_model_parallel_groups())
    losses, norms = [], []
    for step in range(steps):
        loss = pipeline_step(ddp, micro_batches(step))
        finalize_model_grads([ddp], groups=ps.get_model_parallel_groups())
        updated, norm, _ = opt.step()
        assert updated
        opt.zero_grad()
        # DP-average the loss for reporting, as the trainer does
        t = torch.tensor([loss])
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        losses.append(t.item() / ps.get_data_parallel_world_size())
        norms.append(norm)
    return ddp, opt, losses, norms


def assert_matches_serial(ddp, ref: nn.Module) -> None:
    """Each local parameter equals its TP slice of the serial model's parameter."""
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    full = dict(ref.named_parameters())
    for name, p in ddp.module.named_parameters():
        want = full[name]
        if getattr(p, "tensor_model_parallel", False):
            want = want.chunk(tp, dim=p.partition_dim)[tp_rank]
        assert_close(p, want, msg=lambda m, n=name: f"{n}: {m}")


def _layouts_match_serial(layouts):
    ref, ref_losses, ref_norms = serial_reference(3)
    done = []
    for tp, pp, zero, sp in layouts:
        ddp, _, losses, norms = train_3d(tp, pp, zero, sp)
        assert_matches_serial(ddp, ref)
        assert_close(torch.tensor(norms), torch.tensor(ref_norms), msg=f"norms {tp} {pp} {zero}")
        if ps.is_pipeline_last_stage():
            assert_close(torch.tensor(losses), torch.tensor(ref_losses))
        done.append((tp, pp, zero, sp))
        ps.destroy_model_parallel()
    return done


LAYOUTS_4 = [
    # TP=2 x DP=2, with and without sequence parallelism
    (2, 1, 0, False), (2, 1, 1, True), (2, 1, 2, False), (2, 1, 2, True),
    # PP=2 x DP=2 (tied embedding across stages)
    (1, 2, 0, False), (1, 2, 1, False), (1, 2, 2, False),
    # TP=2 x PP=2 (DP=1): the clipping norm counts every parameter once
    (2, 2, 0, False), (2, 2, 2, True),
]  # fmt: skip


def test_tp_pp_dp_layouts_match_one_process():
    """World 4: TPxDP, PPxDP, TPxPP with ZeRO 0/1/2: params, grad norms and losses."""
    results = run_distributed(4, _layouts_match_serial, LAYOUTS_4)
    assert results[0] == LAYOUTS_4


@pytest.mark.slow
def test_tp2_pp2_dp2_zero2_sequence_parallel():
    """World 8: all three dimensions at once under ZeRO-2 with sequence parallelism."""
    layouts = [(2, 2, 2, True)]
    assert run_distributed(8, _layouts_match_serial, layouts)[0] == layouts
