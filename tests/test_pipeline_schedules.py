"""Pipeline schedules on a toy model of plain nn.Linear stages, against the serial model.

Each rank holds some layers of a tanh MLP; the same micro-batches go through no pipelining
(reference, computed on every rank), 1F1B and interleaved 1F1B. Losses and every layer's
gradient must match; 1F1B must hold at most p micro-batches in flight where GPipe holds m.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from megalite import parallel_state as ps
from megalite.pipeline_parallel import (
    PipelineLinks,
    StageP2P,
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)
from megalite.pipeline_parallel.schedules import backward_step, deallocate_output_tensor
from tests.harness import run_distributed

H, S, B = 8, 4, 2  # hidden, sequence, micro-batch size: boundary tensors are [S, B, H]


def _pp_sizes() -> tuple[int, int]:
    """(PP, model chunks per stage) of the live parallel state: the schedule to use."""
    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )


class _Count(torch.autograd.Function):
    """Identity; counts a micro-batch in on forward and out on backward."""

    @staticmethod
    def forward(ctx, x, stage):
        ctx.stage = stage
        stage.live += 1
        stage.peak = max(stage.peak, stage.live)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.stage.live -= 1
        return grad, None


class ToyStage(nn.Module):
    """Layers `layer_ids` of the toy model; weights depend only on the global layer index."""

    def __init__(self, layer_ids, pre_process: bool, post_process: bool):
        super().__init__()
        self.layers = nn.ModuleDict()
        for i in layer_ids:
            g = torch.Generator().manual_seed(1000 + i)
            lin = nn.Linear(H, H)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(H, H, generator=g) / H**0.5)
                lin.bias.copy_(torch.randn(H, generator=g) * 0.1)
            self.layers[str(i)] = lin
        self.pre_process, self.post_process = pre_process, post_process
        self.input_tensor = None
        self.live = self.peak = 0

    def set_input_tensor(self, t):
        self.input_tensor = t

    def forward(self, x):
        h = x if self.pre_process else self.input_tensor
        for lin in self.layers.values():
            h = torch.tanh(lin(h))
        # Counted at the output, whose backward runs first; `* 1.0` returns a fresh tensor,
        # never a view, as the schedule frees stage outputs after sending them.
        return _Count.apply(h, self) * 1.0


def _batches(m):
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)) for _ in range(m)
    ]


def _loss_func(target, out):
    loss = ((out - target) ** 2).mean()
    return loss, {"lm_loss": loss.detach()}


def _forward_step(data_iterator, model):
    x, target = next(data_iterator)
    return model(x), functools.partial(_loss_func, target)


def _grads(chunks):
    return {
        f"{i}.{n}": p.grad.clone()
        for c in chunks
        for i, lin in c.layers.items()
        for n, p in lin.named_parameters()
    }


def _serial(num_layers, m):
    """The reference: the whole model, the mean loss over the micro-batches, one backward."""
    model = ToyStage(range(num_layers), True, True)
    losses = torch.stack([_loss_func(t, model(x))[0] for x, t in _batches(m)])
    losses.mean().backward()
    return losses.detach(), _grads([model])


def _stage_chunks(num_layers, p, v, rank):
    per = num_layers // (p * v)
    return [
        ToyStage(
            range((c * p + rank) * per, (c * p + rank + 1) * per),
            pre_process=rank == 0 and c == 0,
            post_process=rank == p - 1 and c == v - 1,
        )
        for c in range(v)
    ]


def _gpipe(chunk, links, m):
    """All forwards, then all backwards: what 1F1B improves on."""
    p2p, held = StageP2P(links, (S, B, H)), []
    it = iter(_batches(m))
    for _ in range(m):
        inp = p2p.recv_forward()
        chunk.set_input_tensor(inp)
        out, loss_func = _forward_step(it, chunk)
        if links.is_last:
            out = loss_func(out)[0] / m
        else:
            p2p.send_forward(out)
            deallocate_output_tensor(out)
        held.append((inp, out))
    for inp, out in held:
        p2p.send_backward(backward_step(inp, out, p2p.recv_backward(), None))
    return chunk.peak


def _run_pipelined(num_layers, pp, vpp, m):
    """One pipelined run on this rank; returns (losses or None, grads, peak in flight)."""
    ps.initialize_model_parallel(1, pp, virtual_pipeline_model_parallel_size=vpp)
    rank, v = ps.get_pipeline_model_parallel_rank(), vpp or 1
    chunks = _stage_chunks(num_layers, pp, v, rank)
    fb = get_forward_backward_func(
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )
    data = [iter(_batches(m)) for _ in chunks]
    finalized = []
    losses = fb(
        _forward_step,
        data if vpp else data[0],
        chunks if vpp else chunks[0],
        m,
        tensor_shape=(S, B, H),
        finalize_model_grads_func=finalized.append,
    )
    assert finalized == [chunks], "finalize_model_grads_func must get the model chunks once"
    assert all(c.live == 0 for c in chunks), "every forward needs its backward"
    loss = torch.stack([d["lm_loss"] for d in losses]) if losses else None
    grads, peak = _grads(chunks), max(c.peak for c in chunks)
    # Evaluation through the same schedule: the same losses, no gradient touched.
    data = [iter(_batches(m)) for _ in chunks]
    evaluated = fb(
        _forward_step,
        data if vpp else data[0],
        chunks if vpp else chunks[0],
        m,
        tensor_shape=(S, B, H),
        forward_only=True,
        finalize_model_grads_func=finalized.append,
    )
    assert [d["lm_loss"] for d in evaluated] == [d["lm_loss"] for d in losses]
    assert len(finalized) == 1 and _grads(chunks).keys() == grads.keys()
    for key, grad in _grads(chunks).items():
        assert torch.equal(grad, grads[key]), key
    return loss, grads, peak, fb.__name__


def _check_schedules(cases):
    """Every (num_layers, pp, vpp, m) case against the serial model; peaks returned."""
    out = []
    for num_layers, pp, vpp, m in cases:
        ref_loss, ref_grads = _serial(num_layers, m)
        loss, grads, peak, name = _run_pipelined(num_layers, pp, vpp, m)
        if loss is not None:
            torch.testing.assert_close(loss, ref_loss)
        for key, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[key], msg=lambda s, k=key: f"{k}: {s}")
        out.append((name, len(grads), peak))
        ps.destroy_model_parallel()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_schedules_match_serial_model(world):
    # world size 2 and 4: PP=world with 1F1B (m < p, m = p, m > p) and interleaved with v=2
    # (m = p: all warm-up, and m = 2p, 3p: real steady state).
    p = world
    cases = [(2 * p, p, None, m) for m in (1, p, 2 * p + 1)]
    cases += [(2 * p, p, 2, m) for m in (p, 2 * p, 3 * p)]
    results = run_distributed(world, _check_schedules, cases)
    for rank, res in enumerate(results):
        names = [name for name, _, _ in res]
        assert names[:3] == ["forward_backward_pipelining_without_interleaving"] * 3
        assert names[3:] == ["forward_backward_pipelining_with_interleaving"] * 3
        assert all(n_grads > 0 for _, n_grads, _ in res)
        # 1F1B with m = 2p+1 micro-batches: stage r holds at most p - r of them.
        assert res[2][2] == p - rank


def _peaks(m):
    ps.initialize_model_parallel(1, 4)
    links = PipelineLinks.from_parallel_state()
    chunk = _stage_chunks(8, 4, 1, links.stage)[0]
    outputs, held = [], []

    def recording_step(data_iterator, model):
        # Values of earlier outputs still in memory when a new forward starts: the schedule
        # frees each output once sent, so none should be (the last stage keeps its losses).
        held.append(sum(o.numel() for o in outputs if o.numel() > 1))
        out, loss_func = _forward_step(data_iterator, model)
        outputs.append(out)
        return out, loss_func

    forward_backward_pipelining_without_interleaving(
        recording_step, iter(_batches(m)), chunk, m, tensor_shape=(S, B, H)
    )
    one_f_one_b = chunk.peak
    gpipe = _gpipe(_stage_chunks(8, 4, 1, links.stage)[0], links, m)
    return one_f_one_b, gpipe, max(held), links.is_last


def test_1f1b_holds_at_most_p_microbatches_where_gpipe_holds_m():
    # world size 4, PP=4, m=8 micro-batches.
    p, m = 4, 8
    for rank, (one_f_one_b, gpipe, held, last) in enumerate(run_distributed(4, _peaks, m)):
        assert one_f_one_b == p - rank <= p
        assert gpipe == m
        assert held == 0 or last, f"rank {rank} kept {held} values of sent outputs"


def _hooks_and_forward_only():
    ps.initialize_model_parallel(1, 2)
    rank, m = ps.get_pipeline_model_parallel_rank(), 3
    chunk = _stage_chunks(4, 2, 1, rank)[0]
    events = []

    class NoSync:
        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

    def note_backward(module, grad_in, grad_out):
        events.append("bwd")

    list(chunk.layers.values())[0].register_full_backward_hook(note_backward)
    kwargs = dict(tensor_shape=(S, B, H), no_sync_func=NoSync, grad_scale_func=lambda x: 8.0 * x)
    losses = forward_backward_pipelining_without_interleaving(
        _forward_step, iter(_batches(m)), chunk, m, **kwargs
    )
    scaled = _grads([chunk])
    chunk.zero_grad()
    eval_losses = forward_backward_pipelining_without_interleaving(
        _forward_step, iter(_batches(m)), chunk, m, forward_only=True, **kwargs
    )
    assert all(p.grad is None or not p.grad.any() for p in chunk.parameters())
    return events, scaled, [d["lm_loss"] for d in losses], [d["lm_loss"] for d in eval_losses]


def test_hooks_no_sync_grad_scale_and_forward_only():
    # world size 2, PP=2: no_sync wraps all backwards but the last; the loss scale multiplies
    # every gradient; forward_only gives the same losses and touches no gradient.
    ref_loss, ref_grads = _serial(4, 3)
    for rank, (events, scaled, losses, eval_losses) in enumerate(
        run_distributed(2, _hooks_and_forward_only)
    ):
        assert events == ["enter", "bwd", "bwd", "exit", "bwd"]
        for key, grad in scaled.items():
            torch.testing.assert_close(grad, 8.0 * ref_grads[key])
        if rank == 1:
            torch.testing.assert_close(torch.stack(losses), ref_loss)
            torch.testing.assert_close(torch.stack(eval_losses), ref_loss)
        else:
            assert losses == eval_losses == []


def test_interleaved_refuses_bad_microbatch_counts_before_any_work():
    # Single process: fake links, the check runs before any communication.
    links = PipelineLinks(group=None, prev_rank=1, next_rank=1, stage=0, num_stages=4)
    chunks = _stage_chunks(8, 4, 2, 0)
    with pytest.raises(ValueError, match=r"micro-batches \(6\) to be a multiple of the "):
        forward_backward_pipelining_with_interleaving(
            _forward_step, [iter([]), iter([])], chunks, 6, tensor_shape=(S, B, H), links=links
        )
    with pytest.raises(ValueError, match="1F1B runs one model chunk, got 2"):
        forward_backward_pipelining_without_interleaving(
            _forward_step, iter([]), chunks, 4, tensor_shape=(S, B, H), links=links
        )
    with pytest.raises(ValueError, match="needs >= 2 model chunks"):
        forward_backward_pipelining_with_interleaving(
            _forward_step, iter([]), chunks[:1], 4, tensor_shape=(S, B, H), links=links
        )
    with pytest.raises(ValueError, match="num_microbatches must be an integer >= 1, got 0"):
        forward_backward_no_pipelining(_forward_step, iter([]), chunks[0], 0)


def _both_directions_one_peer():
    # PP=2 wraps around: the previous and the next stage are the same rank. An activation and
    # a gradient cross in both directions in one exchange and must not be mixed up.
    ps.initialize_model_parallel(1, 2)
    links = PipelineLinks.from_parallel_state()
    r = links.stage
    act, grad = torch.full((S, B, H), 10.0 + r), torch.full((S, B, H), 20.0 + r)
    from_prev, from_next = StageP2P(links, (S, B, H)).exchange(
        send_next=act, send_prev=grad, recv_prev=True, recv_next=True
    )
    return from_prev.requires_grad, from_prev.unique().item(), from_next.unique().item()


def test_p2p_keeps_activations_and_gradients_apart_when_prev_is_next():
    # world size 2, PP=2.
    for rank, (needs_grad, activation, gradient) in enumerate(
        run_distributed(2, _both_directions_one_peer)
    ):
        other = 1 - rank
        assert needs_grad and activation == 10.0 + other and gradient == 20.0 + other
