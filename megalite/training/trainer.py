"""The training run: build everything from the flags, then step, log, evaluate, save.

Reads top to bottom: `Trainer.__init__` builds (seeds, model, optimizer, checkpoint, data) and
`Trainer.train` is the loop. One iteration = one global batch through the pipeline schedule
(or DeepSpeed's engine), then one optimizer step.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import socket
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.data_parallel import (
    DistributedDataParallel,
    OptimizerConfig,
    build_optimizer,
    finalize_model_grads,
)
from megalite.distributed import device as this_device
from megalite.model import GPTConfig, build_model, num_floating_point_operations
from megalite.model.gpt import pipeline_tensor_shape
from megalite.pipeline_parallel import get_forward_backward_func
from megalite.tensor_parallel.random import get_rng_tracker, model_parallel_manual_seed
from megalite.training import checkpointing as ckpt
from megalite.training.data import MockGPTDataset, microbatch_iterator
from megalite.training.lr_schedule import LRSchedule
from megalite.training.metrics import Reporter, device_peak_tflops


def _node_name() -> str:
    """Slurm's node name when under Slurm (simulated nodes share one hostname), else the host."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _fail_together(error: Optional[str], what: str) -> None:
    """Every rank learns whether any rank failed `what`, and all raise the same message.

    Without this, the rank with a corrupt file stops and the others only see a peer vanish.
    """
    failures = ckpt.agree_on_errors(error)
    if failures:
        who = "; ".join(f"rank {r}: {e}" for r, e in failures)
        raise ckpt.CheckpointError(f"{what} failed ({who})")


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, ...); the message says at which iteration."""


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig:
    """The GPTConfig the flags describe."""
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return GPTConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=vocab_size,
        seq_length=args.seq_length,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        max_position_embeddings=args.max_position_embeddings,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        normalization=args.normalization,
        activation="swiglu" if args.swiglu else "gelu",
        position_embedding_type="rope" if args.position_embedding_type == "rope" else "learned",
        rotary_base=int(args.rotary_base),
        add_bias_linear=not args.disable_bias_linear,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity or "none",
        params_dtype=dtype,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
    )


def optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(
        lr=args.lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        zero_stage=args.zero_stage,
        bf16=args.bf16,
        fp16=args.fp16,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
    )


def _jsonable(args: argparse.Namespace) -> dict:
    return {
        k: v
        for k, v in vars(args).items()
        if isinstance(v, (int, float, str, bool, list, type(None)))
    }


class Trainer:
    """One pretraining run on this rank (every rank builds one)."""

    def __init__(self, args: argparse.Namespace):
        self.args = a = args
        self.rank = dist.get_rank()
        self.device = this_device()
        ps.initialize_model_parallel(
            a.tensor_model_parallel_size,
            a.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=a.virtual_pipeline_model_parallel_size,
        )
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.writer = self.last_stage and self.tp_rank == 0 and self.dp_rank == 0

        # Seeds: python/numpy/torch default streams per pipeline stage, the TP tracker per TP
        # rank (Megatron's offsets). Weights do not depend on them: each parameter is drawn from
        # its own generator seeded by (seed, global name), so init is layout-invariant.
        random.seed(a.seed + 100 * self.pp_rank)
        np.random.seed(a.seed + 100 * self.pp_rank)
        model_parallel_manual_seed(a.seed, self.tp_rank, self.pp_rank)

        tokenizer_vocab = self._vocab_size()
        self.config = model_config(a, tokenizer_vocab)
        a.padded_vocab_size = self.config.padded_vocab_size
        a.true_vocab_size = tokenizer_vocab  # reshard/export tools read it from meta.json
        self.chunks = build_model(self.config, a.seed, device=self.device)
        self.iteration, self.consumed, self.consumed_valid = 0, 0, 0
        self.schedule = LRSchedule(
            a.lr, a.min_lr, a.lr_warmup_iters, a.lr_decay_iters, a.lr_decay_style
        )
        files = self._read_checkpoint()
        self.engine = None
        self.optimizer = None
        if a.deepspeed:
            from megalite.data_parallel.deepspeed_bridge import (
                deepspeed_config_for,
                initialize_deepspeed,
                load_deepspeed_config,
            )

            oc = optimizer_config(a)
            cfg = deepspeed_config_for(
                load_deepspeed_config(a.deepspeed_config),
                a.micro_batch_size,
                a.global_batch_size,
                oc,
            )
            self.engine = initialize_deepspeed(self.chunks[0], cfg, oc)
        else:
            self.chunks = [
                DistributedDataParallel(
                    c,
                    ps.get_data_parallel_group(),
                    a.ddp_bucket_size,
                    a.overlap_grad_reduce,
                    a.zero_stage,
                )
                for c in self.chunks
            ]
            self.optimizer = build_optimizer(optimizer_config(a), self.chunks)
            if files is not None and "optimizer" in files:
                error = None
                try:
                    self.optimizer.load_state_dict(files["optimizer"])
                except (ValueError, KeyError, RuntimeError) as e:
                    error = (
                        f"{e} (a ZeRO checkpoint resumes at the same DP size; use "
                        f"--no-load-optim or tools/checkpoint_reshard.py)"
                    )
                _fail_together(error, f"loading the optimizer state of {a.load}")
        self.forward_backward = get_forward_backward_func()
        self.tensor_shape = pipeline_tensor_shape(self.config, a.micro_batch_size)
        self.train_ds, self.valid_ds = self._datasets()
        self.reporter = Reporter(self.writer, a.metrics_file, a.tensorboard_dir, a.train_iters)
        self.flops_per_iter = num_floating_point_operations(self.config, a.global_batch_size)
        self.peak = device_peak_tflops(a.peak_tflops)

    # --- building -----------------------------------------------------------------------------
    def _vocab_size(self) -> int:
        a = self.args
        if a.mock_data:  # synthetic ids 0..V-1
            if a.vocab_size is None:
                raise ValueError("--vocab-size is required with --mock-data")
            return a.vocab_size
        # NullTokenizer included: its eod is id V, so its vocabulary holds V + 1 entries
        from megalite.data.tokenizers import build_tokenizer

        tok = build_tokenizer(
            a.tokenizer_type, a.tokenizer_model, a.vocab_file, a.merge_file, a.vocab_size
        )
        return tok.vocab_size

    def _datasets(self):
        a = self.args
        gbs = a.global_batch_size
        evals = (a.train_iters // a.eval_interval + 1) * a.eval_iters if a.eval_iters else 0
        if a.mock_data:
            train = MockGPTDataset(a.train_iters * gbs, a.seq_length, a.vocab_size, a.seed)
            valid = MockGPTDataset(max(evals * gbs, 1), a.seq_length, a.vocab_size, a.seed + 1)
            return train, valid if evals else None
        from megalite.data.gpt_dataset import build_train_valid_test_datasets
        from megalite.data.index_cache import distributed_hooks

        is_builder, barrier = distributed_hooks()
        train, valid, _ = build_train_valid_test_datasets(
            a.data_path, a.split, a.seq_length, a.seed,
            (max(a.train_iters * gbs, 1), evals * gbs, 0),
            cache_path=a.data_cache_path, is_builder=is_builder, barrier=barrier,
        )  # fmt: skip
        if train is None:
            raise ValueError(f"--split {a.split} leaves no training documents in --data-path")
        if evals and valid is None:
            self._say(f"warning: --split {a.split} has no validation documents; eval is off")
        return train, valid

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _read_checkpoint(self) -> Optional[dict]:
        """Load weights (now) and return the optimizer state (for after it is built)."""
        a = self.args
        if not a.load:
            return None
        folder, meta = ckpt.load_meta(a.load)
        if folder is None:
            self._say(f"no checkpoint in --load {a.load}: training from scratch")
            return None
        ckpt.check_compatible(meta, a, folder)
        coords = {"tp": self.tp_rank, "pp": self.pp_rank, "dp": self.dp_rank}
        load_optim = not (a.no_load_optim or a.finetune or a.deepspeed)
        files, error = None, None
        try:
            files = ckpt.load_shard_files(
                folder,
                coords,
                optim=load_optim,
                optimizer_sharded=meta["args"].get("zero_stage", 0) > 0,
                rng=not (a.no_load_rng or a.finetune),
            )
            for i, chunk in enumerate(self.chunks):
                chunk.load_state_dict(files["model"][f"chunk{i}"])
        except (ckpt.CheckpointError, RuntimeError, KeyError) as e:
            error = str(e)
        _fail_together(error, f"loading {folder}")
        if files.get("rng") is not None:
            get_rng_tracker().set_states(ckpt.set_rng_state(files["rng"]))
        if not a.finetune:
            self.iteration = meta["iteration"]
            self.consumed = meta["consumed_train_samples"]
            self.consumed_valid = meta.get("consumed_valid_samples", 0)
        self._say(f"loaded checkpoint {folder} (iteration {meta['iteration']})")
        return files

    # --- one step -----------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
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

    def _micro(self, dataset, consumed: int):
        a = self.args
        it = microbatch_iterator(
            dataset,
            consumed,
            a.micro_batch_size,
            self.dp,
            self.dp_rank,
            a.num_microbatches,
            self.device,
            self.config.vocab_size,
        )
        if len(self.chunks) > 1:  # interleaved: every chunk reads the same micro-batches
            batches = list(it)
            return [iter(batches) for _ in self.chunks]
        return it

    def _mean_loss(self, outputs: list[dict]) -> Optional[float]:
        """Mean lm loss over this step's global batch (every micro-batch, every DP rank)."""
        if not self.last_stage:
            return None
        loss = torch.stack([o["lm_loss"].float() for o in outputs]).mean().to(self.device)
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        return loss.item() / self.dp

    def train_step(self, lr: float) -> tuple[Optional[float], bool, Optional[float]]:
        """(loss on the last stage, updated, grad norm)."""
        a = self.args
        if self.engine is not None:
            return self._deepspeed_step(lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()
        outputs = self.forward_backward(
            self._forward_step, self._micro(self.train_ds, self.consumed),
            self.chunks, a.num_microbatches,
            tensor_shape=self.tensor_shape, dtype=self.config.params_dtype,
            no_sync_func=[c.no_sync for c in self.chunks],
            finalize_model_grads_func=finalize_model_grads,
            grad_scale_func=self.optimizer.scale_loss,
        )  # fmt: skip
        updated, grad_norm, _ = self.optimizer.step()
        return self._mean_loss(outputs), updated, grad_norm

    def _deepspeed_step(self, lr: float):
        engine = self.engine
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        outputs = []
        for batch in self._micro(self.train_ds, self.consumed):
            loss = engine(batch["tokens"], batch["labels"]).float().mean()
            engine.backward(loss)
            engine.step()
            outputs.append({"lm_loss": loss.detach()})
        norm = engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        return self._mean_loss(outputs), engine.was_step_applied(), norm

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        a = self.args
        for c in self.chunks:
            c.eval()
        losses = []
        for _ in range(a.eval_iters):
            data = self._micro(self.valid_ds, self.consumed_valid)
            if self.engine is not None:
                outputs = [
                    {"lm_loss": self.engine(b["tokens"], b["labels"]).float().mean()} for b in data
                ]
            else:
                outputs = self.forward_backward(
                    self._forward_step, data,
                    self.chunks, a.num_microbatches,
                    tensor_shape=self.tensor_shape, dtype=self.config.params_dtype,
                    forward_only=True,
                )  # fmt: skip
            losses.append(self._mean_loss(outputs))
            self.consumed_valid += a.global_batch_size
        for c in self.chunks:
            c.train()
        return sum(losses) / len(losses) if self.last_stage else None

    # --- checkpoints --------------------------------------------------------------------------
    def save(self) -> None:
        a = self.args
        meta = {
            "args": _jsonable(a),
            "consumed_train_samples": self.consumed,
            "consumed_valid_samples": self.consumed_valid,
            "lr_schedule": self.schedule.state_dict(),
            "world_size": dist.get_world_size(),
            "data_parallel_size": self.dp,
        }
        ckpt.save_checkpoint(
            a.save, self.iteration,
            coords={"tp": self.tp_rank, "pp": self.pp_rank, "dp": self.dp_rank},
            model_state=lambda: {f"chunk{i}": c.module.state_dict()
                                 for i, c in enumerate(self.chunks)},
            optimizer_state=self.optimizer.state_dict, optimizer_sharded=a.zero_stage > 0,
            rng_state=ckpt.get_rng_state(get_rng_tracker().get_states()), meta=meta,
        )  # fmt: skip
        self._say(f"saved checkpoint at iteration {self.iteration} to {a.save}")

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> None:
        a = self.args
        skipped, tokens = 0, a.global_batch_size * a.seq_length
        last = min(a.train_iters, a.exit_interval or a.train_iters)
        self._say(
            f"training {self.config.num_layers}-layer GPT (hidden {self.config.hidden_size}, "
            f"vocab {self.config.padded_vocab_size}) on {dist.get_world_size()} ranks: "
            f"TP {ps.get_tensor_model_parallel_world_size()} x PP "
            f"{ps.get_pipeline_model_parallel_world_size()} x DP {self.dp}, "
            f"{a.num_microbatches} micro-batches of {a.micro_batch_size}, "
            f"iterations {self.iteration}..{last}"
        )
        self._say("placement: " + self._placement())
        start_iteration = self.iteration
        saved_at = self.iteration if a.load else None
        while self.iteration < last:
            lr = self.schedule.lr(self.iteration)
            start = time.perf_counter()
            loss, updated, grad_norm = self.train_step(lr)
            step_time = time.perf_counter() - start
            self.iteration += 1
            self.consumed += a.global_batch_size
            skipped += 0 if updated else 1
            if updated and (grad_norm is None or not math.isfinite(grad_norm)) and not a.fp16:
                raise TrainingError(
                    f"loss or gradient is NaN/inf at iteration {self.iteration} "
                    f"(grad norm {grad_norm}); stopping. Last checkpoint is untouched."
                )
            if self.iteration % a.log_interval == 0 or self.iteration == last:
                self._log(loss, lr, grad_norm, skipped, step_time, tokens)
            if (
                a.eval_iters
                and self.valid_ds is not None
                and (self.iteration % a.eval_interval == 0)
            ):
                value = self.evaluate()
                if self.writer:
                    self.reporter.valid(self.iteration, value)
            if a.save and a.save_interval and self.iteration % a.save_interval == 0:
                self.save()
                saved_at = self.iteration
        if a.save and saved_at != self.iteration:
            self.save()
        self.reporter.close()
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one line per node: proof it stepped
            print(
                f"node {_node_name()}: rank {self.rank} finished iterations "
                f"{start_iteration + 1}..{self.iteration}",
                flush=True,
            )

    def _placement(self) -> str:
        """Which node holds which ranks, e.g. ``n1: ranks 0-3; n2: ranks 4-7``."""
        nodes: list = [None] * dist.get_world_size()
        dist.all_gather_object(nodes, _node_name())
        spans: dict[str, list[int]] = {}
        for r, n in enumerate(nodes):
            spans.setdefault(n, []).append(r)
        return "; ".join(
            f"{n}: ranks {r[0]}-{r[-1]}" if r == list(range(r[0], r[-1] + 1)) else f"{n}: {r}"
            for n, r in spans.items()
        )

    def _log(self, loss, lr, grad_norm, skipped, step_time, tokens) -> None:
        if not self.writer:
            return
        tflops = self.flops_per_iter / step_time / dist.get_world_size() / 1e12
        record = {
            "iteration": self.iteration,
            "consumed_samples": self.consumed,
            "lm_loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped_iterations": skipped,
            "step_time_s": step_time,
            "tokens_per_sec": tokens / step_time,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
        }
        if self.args.fp16:
            scaler = self.optimizer if self.optimizer is not None else None
            record["loss_scale"] = scaler.get_loss_scale() if scaler else None
        self.reporter.train(record)
