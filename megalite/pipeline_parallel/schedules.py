"""Forward/backward schedules over micro-batches: no pipelining, 1F1B, and (in
`interleaved.py`) interleaved 1F1B over virtual stages.

Every schedule has the same signature, so the trainer calls whatever `get_forward_backward_func`
returns::

    losses = fb(forward_step_func, data_iterator, model, num_microbatches,
                tensor_shape=(s, b, h), dtype=torch.float32, forward_only=False,
                no_sync_func=None, finalize_model_grads_func=None, grad_scale_func=None)

* ``forward_step_func(data_iterator, model) -> (output_tensor, loss_func)`` runs one micro-batch
  through one model chunk (Megatron's contract). On the last stage ``loss_func(output_tensor)``
  returns ``(loss, {"lm_loss": loss.detach(), ...})``; elsewhere `output_tensor` is the stage's
  activation ``tensor_shape``. A chunk that is not the first takes its input from
  ``model.set_input_tensor(t)``, called by the schedule before `forward_step_func`.
* The loss is divided by `num_microbatches` before backward, so accumulated gradients are those
  of the mean loss over the micro-batches. The returned list holds one dict per micro-batch on
  the last stage (the dicts as `loss_func` returned them, not divided) and is empty elsewhere.
* ``no_sync_func()`` (or a list of them, one per model chunk, e.g. each chunk's DDP
  ``no_sync``) returns a context under which backward must not synchronize data-parallel
  gradients: it is entered before the first backward and left right before the backward of the
  last micro-batch, so a DDP wrapper reduces once per step. Interleaved with a list: each
  chunk's context is left before that chunk's last backward; with one callable, before the
  first backward that is some chunk's last (Megatron's behaviour).
* ``finalize_model_grads_func(model_chunks)`` runs after the last backward (data-parallel,
  sequence-parallel and tied-embedding reductions, see `megalite.model.grads`).
* ``grad_scale_func(loss) -> scaled loss`` applies the fp16 loss scale before backward.
* ``forward_only=True`` (evaluation) runs every forward under ``torch.no_grad`` and no backward.

Memory: once a stage's output has been sent on, only its autograd graph is needed for the
backward, not its values, so `deallocate_output_tensor` swaps its storage for a one-element
placeholder (Megatron's trick) and `custom_backward` runs the engine directly, skipping the
Python-side check that the gradient's shape matches the (now one-element) output. Held
activations then follow the schedule's bound: at most p micro-batches in flight under 1F1B.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.autograd.variable import Variable

from megalite.pipeline_parallel.p2p import PipelineLinks, Shape, StageP2P

ForwardStepFunc = Callable[[Any, nn.Module], tuple[torch.Tensor, Callable]]
Model = Union[nn.Module, list[nn.Module]]


# --- the pieces every schedule shares ---------------------------------------------------------
def deallocate_output_tensor(out: Optional[torch.Tensor]) -> None:
    """Free an already-sent output's values, keeping its ``grad_fn`` for the backward.

    Only valid when the op that made `out` did not save `out` itself for its backward (tanh,
    sigmoid and exp do): GPT stages end with a residual add, which saves nothing.
    """
    if out is None:
        return
    if out._base is not None:
        # Freeing a view would keep its base alive anyway: stages must return fresh tensors.
        raise RuntimeError("a pipeline stage output must not be a view of another tensor")
    out.data = torch.empty((1,), device=out.device, dtype=out.dtype)


def custom_backward(output: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``output.backward(grad_output)`` that tolerates a deallocated `output`.

    `torch.autograd.backward` checks shapes in Python against ``output.shape`` (now ``[1]``);
    the engine checks against the shape recorded in ``grad_fn``, which is still the real one.
    """
    Variable._execution_engine.run_backward(
        tensors=(output,),
        grad_tensors=(grad_output,),
        keep_graph=False,
        create_graph=False,
        inputs=(),
        allow_unreachable=True,
        accumulate_grad=True,
    )


def set_input_tensor(model: nn.Module, input_tensor: Optional[torch.Tensor]) -> None:
    """Call ``set_input_tensor`` on `model` or on the module it wraps (DDP, fp16 wrappers)."""
    inner = model
    while not hasattr(inner, "set_input_tensor"):
        if not hasattr(inner, "module"):
            raise AttributeError(f"{type(model).__name__} has no set_input_tensor method")
        inner = inner.module
    inner.set_input_tensor(input_tensor)


def forward_step(
    forward_step_func: ForwardStepFunc,
    data_iterator: Any,
    model: nn.Module,
    num_microbatches: int,
    input_tensor: Optional[torch.Tensor],
    losses: list[dict],
    is_last_stage: bool,
) -> torch.Tensor:
    """One micro-batch through one chunk; on the last stage the loss / `num_microbatches`."""
    set_input_tensor(model, input_tensor)
    output_tensor, loss_func = forward_step_func(data_iterator, model)
    if is_last_stage:
        loss, loss_dict = loss_func(output_tensor)
        losses.append(loss_dict)
        output_tensor = loss / num_microbatches
    return output_tensor


def backward_step(
    input_tensor: Optional[torch.Tensor],
    output_tensor: torch.Tensor,
    output_tensor_grad: Optional[torch.Tensor],
    grad_scale_func: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> Optional[torch.Tensor]:
    """Backward through one chunk; returns the gradient of its input (None on the first)."""
    if output_tensor_grad is None:
        # Last stage: `output_tensor` is the loss (never deallocated), scaled for fp16 here.
        if grad_scale_func is not None:
            output_tensor = grad_scale_func(output_tensor)
        output_tensor_grad = torch.ones_like(output_tensor)
        torch.autograd.backward(output_tensor, grad_tensors=output_tensor_grad)
    else:
        custom_backward(output_tensor, output_tensor_grad)
    return None if input_tensor is None else input_tensor.grad


class GradSyncControl:
    """Enter the `no_sync_func` contexts once, leave them once: DDP reduces only after that.

    `no_sync_func` is one callable or a list of them, one per model chunk. With a list, chunk c's
    context is left by ``enable_sync(c)`` right before *that chunk's* last backward (a chunk's
    DDP reduces each bucket once, when its last gradient of the step arrives); ``enable_sync()``
    without a chunk leaves every context that is still open.
    """

    def __init__(self, no_sync_func, enabled: bool, num_chunks: int = 1):
        if no_sync_func is None or not enabled:
            funcs = []
        elif isinstance(no_sync_func, (list, tuple)):
            funcs = list(no_sync_func)
            if len(funcs) != num_chunks:
                raise ValueError(f"got {len(funcs)} no_sync_func for {num_chunks} model chunks")
        else:
            funcs = [no_sync_func]
        self.funcs = funcs
        self.stacks: dict[int, contextlib.ExitStack] = {}

    def disable_sync(self) -> None:
        for i, func in enumerate(self.funcs):
            if i not in self.stacks:
                self.stacks[i] = contextlib.ExitStack()
                self.stacks[i].enter_context(func())

    def enable_sync(self, chunk: Optional[int] = None) -> None:
        if chunk is not None and len(self.funcs) > 1:
            if chunk in self.stacks:
                self.stacks.pop(chunk).close()
            return
        for i in list(self.stacks):
            self.stacks.pop(i).close()


def as_chunks(model: Model) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def model_device(chunk: nn.Module) -> torch.device:
    param = next(chunk.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _single_chunk(model: Model, data_iterator: Any, schedule: str):
    chunks = as_chunks(model)
    if len(chunks) != 1:
        raise ValueError(
            f"{schedule} runs one model chunk, got {len(chunks)}: use the interleaved schedule"
            " for virtual pipeline stages"
        )
    if isinstance(data_iterator, (list, tuple)):
        data_iterator = data_iterator[0]
    return chunks, data_iterator


def _check_microbatches(num_microbatches: int) -> None:
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")


# --- schedules ---------------------------------------------------------------------------------
def forward_backward_no_pipelining(
    forward_step_func: ForwardStepFunc,
    data_iterator: Any,
    model: Model,
    num_microbatches: int,
    *,
    tensor_shape: Optional[Shape] = None,
    dtype: torch.dtype = torch.float32,
    forward_only: bool = False,
    no_sync_func=None,
    finalize_model_grads_func: Optional[Callable[[list[nn.Module]], None]] = None,
    grad_scale_func: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    links: Optional[PipelineLinks] = None,
) -> list[dict]:
    """Gradient accumulation over micro-batches on a single stage (PP=1).

    `tensor_shape`, `dtype` and `links` are accepted for a common signature and unused.
    """
    _check_microbatches(num_microbatches)
    chunks, data_iterator = _single_chunk(model, data_iterator, "forward_backward_no_pipelining")
    chunk, losses = chunks[0], []
    sync = GradSyncControl(no_sync_func, enabled=not forward_only)
    grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
    with grad_mode:
        sync.disable_sync()
        for i in range(num_microbatches):
            out = forward_step(
                forward_step_func, data_iterator, chunk, num_microbatches, None, losses, True
            )
            if not forward_only:
                if i == num_microbatches - 1:
                    sync.enable_sync()
                backward_step(None, out, None, grad_scale_func)
    if not forward_only and finalize_model_grads_func is not None:
        finalize_model_grads_func(chunks)
    return losses


def forward_backward_pipelining_without_interleaving(
    forward_step_func: ForwardStepFunc,
    data_iterator: Any,
    model: Model,
    num_microbatches: int,
    *,
    tensor_shape: Optional[Shape] = None,
    dtype: torch.dtype = torch.float32,
    forward_only: bool = False,
    no_sync_func=None,
    finalize_model_grads_func: Optional[Callable[[list[nn.Module]], None]] = None,
    grad_scale_func: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    links: Optional[PipelineLinks] = None,
) -> list[dict]:
    """1F1B: warm-up forwards, then one-forward-one-backward, then cool-down backwards.

    Stage ``r`` of ``p`` runs ``min(p - r - 1, m)`` warm-up forwards, so it never holds more
    than ``p - r`` micro-batches' activations (GPipe would hold all ``m``). `tensor_shape` is
    the ``[s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism) of every stage boundary.
    """
    _check_microbatches(num_microbatches)
    chunks, data_iterator = _single_chunk(model, data_iterator, "1F1B")
    chunk = chunks[0]
    links = links if links is not None else PipelineLinks.from_parallel_state()
    if tensor_shape is None:
        raise ValueError("pipelined schedules need tensor_shape, the [s, b, h] between stages")
    p2p = StageP2P(links, tensor_shape, dtype, model_device(chunk))
    m, last = num_microbatches, links.is_last
    num_warmup = min(links.num_stages - links.stage - 1, m)
    num_steady = m - num_warmup
    inputs: list[Optional[torch.Tensor]] = []
    outputs: list[torch.Tensor] = []
    losses: list[dict] = []
    sync = GradSyncControl(no_sync_func, enabled=not forward_only)

    def run_forward(input_tensor):
        return forward_step(forward_step_func, data_iterator, chunk, m, input_tensor, losses, last)

    def keep(input_tensor, output_tensor):
        # Hold what the backward needs; the output's values are already with the next stage.
        inputs.append(input_tensor)
        outputs.append(output_tensor)
        if not last:
            deallocate_output_tensor(output_tensor)

    def run_backward(output_grad):
        return backward_step(inputs.pop(0), outputs.pop(0), output_grad, grad_scale_func)

    grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
    with grad_mode:
        sync.disable_sync()
        # Warm-up: forwards only, to fill the pipeline below this stage.
        for _ in range(num_warmup):
            input_tensor = p2p.recv_forward()
            output_tensor = run_forward(input_tensor)
            p2p.send_forward(output_tensor)
            if not forward_only:
                keep(input_tensor, output_tensor)

        # Steady state: each forward is followed by the backward of the oldest micro-batch.
        input_tensor = p2p.recv_forward() if num_steady > 0 else None
        for i in range(num_steady):
            last_iteration = i == num_steady - 1
            output_tensor = run_forward(input_tensor)
            if forward_only:
                p2p.send_forward(output_tensor)
                input_tensor = None if last_iteration else p2p.recv_forward()
                continue
            output_grad = p2p.send_forward_recv_backward(output_tensor)
            keep(input_tensor, output_tensor)
            if num_warmup == 0 and last_iteration:
                sync.enable_sync()  # this is the last micro-batch's backward
            input_grad = run_backward(output_grad)
            if last_iteration:
                input_tensor = None
                p2p.send_backward(input_grad)
            else:
                input_tensor = p2p.send_backward_recv_forward(input_grad)

        # Cool-down: the backwards of the warm-up micro-batches.
        if not forward_only:
            for i in range(num_warmup):
                if i == num_warmup - 1:
                    sync.enable_sync()
                input_grad = run_backward(p2p.recv_backward())
                p2p.send_backward(input_grad)
            sync.enable_sync()
    if not forward_only and finalize_model_grads_func is not None:
        finalize_model_grads_func(chunks)
    return losses
