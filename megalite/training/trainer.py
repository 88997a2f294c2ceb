"""The training run: plain build functions, then the loop.

`build_*` turn a resolved `RunConfig` into the seeds, the model, the engine (megalite's stack or
DeepSpeed's, see `engine`) and the datasets; `Trainer.train` is the loop: one iteration = one
global batch through the engine, then logging, evaluation and checkpoints.
"""

from __future__ import annotations

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
from megalite.checkpoint import format as ckpt
from megalite.checkpoint.async_save import AsyncCheckpointSaver
from megalite.config.fields import to_dict
from megalite.context_parallel import split_batch
from megalite.distributed import device as this_device
from megalite.errors import UserError
from megalite.model import GPTConfig, build_model, num_floating_point_operations
from megalite.tensor_parallel.random import get_rng_tracker, model_parallel_manual_seed
from megalite.training.config import RunConfig
from megalite.training.data import MockGPTDataset, microbatch_iterator
from megalite.training.engine import Engine, build_engine
from megalite.training.exit_signals import ExitWatch
from megalite.training.memory import ManualGC
from megalite.training.metrics import Reporter, device_peak_tflops


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (NaN loss, ...); the message says at which iteration."""


class DataSetupError(UserError, ValueError):
    """The data or tokenizer flags name something that cannot be read."""


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


# --- building --------------------------------------------------------------------------------
def seed_everything(seed: int, tp_rank: int, pp_rank: int) -> None:
    """python/numpy/torch default streams per pipeline stage, the TP tracker per TP rank
    (Megatron's offsets). Weights do not depend on them: each parameter is drawn from its own
    generator seeded by (seed, global name), so initialization is layout-invariant."""
    random.seed(seed + 100 * pp_rank)
    np.random.seed(seed + 100 * pp_rank)
    model_parallel_manual_seed(seed, tp_rank, pp_rank)


def tokenizer_vocab_size(cfg: RunConfig) -> int:
    """The vocabulary the model embeds: --vocab-size for mock data, else the tokenizer's
    (NullTokenizer's holds V + 1 ids: its eod is V)."""
    d = cfg.data
    if d.mock_data:
        return d.vocab_size
    from megalite.data.config import tokenizer_from_settings

    try:
        tok = tokenizer_from_settings(to_dict(d))
    except (ValueError, OSError) as e:  # a file the flags name is missing or unreadable
        raise DataSetupError(str(e)) from None
    return tok.vocab_size


def build_datasets(cfg: RunConfig, say):
    """(train, valid or None) datasets long enough for the whole run."""
    d, t, log = cfg.data, cfg.training, cfg.logging
    gbs, iters = t.global_batch_size, cfg.train_iters
    evals = (iters // log.eval_interval + 1) * log.eval_iters if log.eval_iters else 0
    if d.mock_data:
        train = MockGPTDataset(iters * gbs, cfg.model.seq_length, d.vocab_size, t.seed)
        valid = MockGPTDataset(max(evals * gbs, 1), cfg.model.seq_length, d.vocab_size, t.seed + 1)
        return train, valid if evals else None
    from megalite.data.gpt_dataset import build_train_valid_test_datasets
    from megalite.data.index_cache import distributed_hooks

    is_builder, barrier = distributed_hooks()
    try:
        train, valid, _ = build_train_valid_test_datasets(
            d.data_path, d.split, cfg.model.seq_length, t.seed,
            (max(iters * gbs, 1), evals * gbs, 0),
            cache_path=d.data_cache_path, is_builder=is_builder, barrier=barrier,
        )  # fmt: skip
    except (ValueError, OSError) as e:  # missing / truncated / inconsistent data files
        raise DataSetupError(str(e)) from None
    if train is None:
        raise DataSetupError(f"--split {d.split} leaves no training documents in --data-path")
    if evals and valid is None:
        say(f"warning: --split {d.split} has no validation documents; eval is off")
    return train, valid


class Trainer:
    """One pretraining run on this rank (every rank builds one)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        # the wall-clock budget counts from here (before the model is built or loaded)
        self.exit_watch = ExitWatch(cfg.exit, device=this_device())
        self.rank = dist.get_rank()
        self.device = this_device()
        p = cfg.parallel
        split = cfg.model_config(vocab_size=None)
        ps.initialize_model_parallel(
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=split.virtual_pipeline_size
            if p.num_layers_per_virtual_pipeline_stage
            else None,
            context_parallel_size=p.context_parallel_size,
            expert_model_parallel_size=cfg.moe.expert_model_parallel_size,
            expert_tensor_parallel_size=cfg.moe.expert_tensor_parallel_size,
        )
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.cp_rank, self.cp = ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()
        # Checkpoint files are per DP x CP rank (CP ranks hold the same weights and, under ZeRO,
        # shards of one DP x CP optimizer), so a checkpoint reads like one of DP size DP x CP.
        self.ckpt_dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.writer = self.last_stage and self.tp_rank == 0 and self.dp_rank == 0
        self.writer = self.writer and self.cp_rank == 0
        if self.rank == 0:
            from megalite.training.arguments import dump_yaml

            print("resolved configuration:\n" + dump_yaml(cfg), flush=True)

        # CP ranks hold different tokens: their dropout masks must differ too. 7919 (prime, more
        # than 100 x any PP size) keeps (CP, PP) offsets apart; CP = 1 keeps the old seeds.
        seed_everything(cfg.training.seed + 7919 * self.cp_rank, self.tp_rank, self.pp_rank)
        self.config: GPTConfig = cfg.model_config(tokenizer_vocab_size(cfg))
        self.moe = cfg.moe if cfg.moe.enabled else None
        chunks = build_model(self.config, cfg.training.seed, device=self.device, moe=self.moe)
        self.iteration, self.consumed, self.consumed_valid = 0, 0, 0
        self.schedule, self.decoupled_schedule = cfg.lr_schedules()
        files = self._read_checkpoint(chunks)
        self.engine: Engine = build_engine(cfg, chunks, self.device)
        if files is not None and "optimizer" in files:
            error = None
            try:
                self.engine.load_optimizer_state(files["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                error = (
                    f"{e} (a ZeRO checkpoint resumes at the same DP size; use "
                    f"--no-load-optim or megalite-reshard)"
                )
            _fail_together(error, f"loading the optimizer state of {cfg.checkpoint.load}")
        self.train_ds, self.valid_ds = build_datasets(cfg, self._say)
        log = cfg.logging
        self.reporter = Reporter(
            self.writer, log.metrics_file, log.tensorboard_dir, cfg.train_iters
        )
        self.saver = AsyncCheckpointSaver() if cfg.checkpoint.async_save else None
        self.peak = device_peak_tflops(log.peak_tflops)
        self.manual_gc = ManualGC(cfg.training.manual_gc, cfg.training.manual_gc_interval)

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    # --- checkpoints --------------------------------------------------------------------------
    def _read_checkpoint(self, chunks: list) -> Optional[dict]:
        """Load weights (now) and return the optimizer state (for after the engine is built)."""
        c = self.cfg.checkpoint
        if not c.load:
            return None
        folder, meta = ckpt.load_meta(c.load)
        if folder is None:
            self._say(f"no checkpoint in --load {c.load}: training from scratch")
            return None
        ckpt.check_compatible(meta, self.config, folder, to_dict(self.cfg.data))
        self._check_expert_layout(meta, folder)
        coords = {"tp": self.tp_rank, "pp": self.pp_rank, "dp": self.ckpt_dp_rank}
        if self.moe is not None:  # a resharded MoE checkpoint keeps experts per (ep, etp)
            coords["ep"] = ps.get_expert_model_parallel_rank()
            coords["etp"] = ps.get_expert_tensor_parallel_rank()
        load_optim = not (c.no_load_optim or c.finetune or self.cfg.parallel.deepspeed)
        files, error = None, None
        try:
            files = ckpt.load_shard_files(
                folder,
                coords,
                optim=load_optim,
                optimizer_sharded=meta["optimizer_sharded"],
                rng=not (c.no_load_rng or c.finetune),
            )
            for i, chunk in enumerate(chunks):
                chunk.load_state_dict(files["model"][f"chunk{i}"])
            if self.cfg.parallel.deepspeed and not (c.no_load_optim or c.finetune):
                from megalite.data_parallel.deepspeed_checkpoint import read_optimizer_state

                files["optimizer"] = read_optimizer_state(folder, coords)
        except (ckpt.CheckpointError, RuntimeError, KeyError) as e:
            error = str(e)
        _fail_together(error, f"loading {folder}")
        if files.get("rng") is not None:
            get_rng_tracker().set_states(ckpt.set_rng_state(files["rng"]))
        if not c.finetune:
            self.iteration = meta["iteration"]
            self.consumed = meta["consumed_train_samples"]
            self.consumed_valid = meta.get("consumed_valid_samples", 0)
        self._say(f"loaded checkpoint {folder} (iteration {meta['iteration']})")
        return files

    # --- MoE: experts that differ across DP ranks are saved by every DP rank -----------------
    def _expert_layout(self) -> Optional[dict]:
        if self.moe is None:
            return None
        return {
            "num_experts": self.moe.num_experts,
            "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
            "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size(),
        }

    def _experts_split_over_dp(self) -> bool:
        """True when DP ranks of one (TP, PP) shard hold different expert weights: EP > 1, or
        ETP other than 1 and TP."""
        if self.moe is None:
            return False
        etp = ps.get_expert_tensor_parallel_world_size()
        tp = ps.get_tensor_model_parallel_world_size()
        return ps.get_expert_model_parallel_world_size() > 1 or etp not in (1, tp)

    def _optimizer_per_dp_rank(self) -> bool:
        """ZeRO shards, or (MoE) a replicated optimizer whose expert state differs by DP rank:
        every DP rank writes its own optimizer file."""
        return self.engine.optimizer_sharded or self._experts_split_over_dp()

    def _expert_state(self) -> dict:
        return {
            f"chunk{i}": {
                name: p.detach()
                for name, p in self.engine.unwrap(c).named_parameters()
                if getattr(p, "expert", False)
            }
            for i, c in enumerate(self.engine.chunks)
        }

    def _check_expert_layout(self, meta: dict, folder) -> None:
        saved, mine = meta.get("expert_layout"), self._expert_layout()
        if saved != mine:
            raise ckpt.CheckpointError(
                f"checkpoint {folder} has MoE layout {saved}, this run {mine}: to resume at "
                "another expert layout, convert the checkpoint first with megalite-reshard "
                "(--target-expert-model-parallel-size / --target-expert-tensor-parallel-size)"
            )
        # The trainer's experts_dpNNN.pt files hold DP rank NNN's experts: they fit this DP size
        # only (a resharded checkpoint keeps experts per (ep, etp) instead and fits any).
        had = meta.get("data_parallel_size", self.dp) * meta.get("context_parallel_size", 1)
        if had != self.dp * self.cp and any(folder.glob("mp_rank_*/experts_dp*.pt")):
            raise ckpt.CheckpointError(
                f"checkpoint {folder} keeps the experts of each of its {had} DP x CP ranks; this "
                f"run has DP x CP = {self.dp * self.cp}: convert it first with megalite-reshard "
                "(a resharded checkpoint resumes at any DP size)"
            )

    def save(self) -> None:
        from megalite.training.arguments import dump_yaml

        cfg = self.cfg
        settings = {
            k: v
            for section in cfg.sections().values()
            for k, v in to_dict(section, cli_only=True).items()
        }
        meta = {
            "settings": settings,
            "model": to_dict(self.config),
            "padded_vocab_size": self.config.padded_vocab_size,
            "optimizer_sharded": self._optimizer_per_dp_rank(),
            "consumed_train_samples": self.consumed,
            "consumed_valid_samples": self.consumed_valid,
            "lr_schedule": self.schedule.state_dict(),
            "world_size": dist.get_world_size(),
            "data_parallel_size": self.dp,
            "context_parallel_size": self.cp,
            "expert_layout": self._expert_layout(),
        }
        common = dict(
            coords={"tp": self.tp_rank, "pp": self.pp_rank, "dp": self.ckpt_dp_rank},
            rng_state=ckpt.get_rng_state(get_rng_tracker().get_states()), meta=meta,
            extra_files={ckpt.CONFIG_FILE: dump_yaml(cfg)},
        )  # fmt: skip
        root, how = cfg.checkpoint.save, "in the background" if self.saver else ""
        if cfg.parallel.deepspeed:
            from megalite.data_parallel.deepspeed_checkpoint import save_deepspeed_checkpoint

            save_deepspeed_checkpoint(
                root, self.iteration, self.engine.engine, self.engine.chunks[0],
                saver=self.saver, **common,
            )  # fmt: skip
        else:
            save = self.saver.save if self.saver else ckpt.save_checkpoint
            save(
                root, self.iteration, model_state=self.engine.model_state,
                optimizer_state=self.engine.optimizer_state,
                optimizer_sharded=self._optimizer_per_dp_rank(),
                expert_state=self._expert_state if self._experts_split_over_dp() else None,
                **common,
            )  # fmt: skip
        self.manual_gc.after_save()
        if self.saver:
            self._say(f"saving checkpoint at iteration {self.iteration} to {root} {how}")
        else:
            self._say(f"saved checkpoint at iteration {self.iteration} to {root}")

    def _publish_async(self, wait: bool) -> None:
        """--async-save: publish the save in flight once every rank wrote it (`wait`: now)."""
        if self.saver is None:
            return
        done = self.saver.finalize() if wait else self.saver.poll()
        if done is not None:
            self._say(f"saved checkpoint at iteration {done} to {self.cfg.checkpoint.save}")

    # --- one step -----------------------------------------------------------------------------
    def _micro(self, dataset, consumed: int, num_microbatches: int) -> list:
        """One iterator of this DP rank's micro-batches per model chunk (interleaving: every
        chunk reads the same micro-batches)."""
        it = microbatch_iterator(
            dataset,
            consumed,
            self.cfg.training.micro_batch_size,
            self.dp,
            self.dp_rank,
            num_microbatches,
            self.device,
            self.config.vocab_size,
        )
        if self.cp > 1:  # every CP rank keeps its load-balanced part of each sequence
            it = (split_batch(batch, self.cp, self.cp_rank) for batch in it)
        if len(self.engine.chunks) > 1:
            batches = list(it)
            return [iter(batches) for _ in self.engine.chunks]
        return [it]

    def _num_microbatches(self, global_batch: int) -> int:
        return global_batch // (self.cfg.training.micro_batch_size * self.dp)

    def _lrs(self) -> tuple[float, Optional[float]]:
        if self.cfg.sample_based:
            position, step = self.consumed, self.cfg.batch_size_at(self.consumed)
        else:
            position, step = self.iteration, 1
        lr = self.schedule.lr(position, step)
        decoupled = self.decoupled_schedule
        return lr, decoupled.lr(position, step) if decoupled is not None else None

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        cfg = self.cfg
        self.manual_gc.before_eval()
        self.engine.train(False)
        gbs = cfg.training.global_batch_size
        losses = []
        for _ in range(cfg.logging.eval_iters):
            n = self._num_microbatches(gbs)
            losses.append(
                self.engine.eval_step(self._micro(self.valid_ds, self.consumed_valid, n), n)
            )
            self.consumed_valid += gbs
        self.engine.train(True)
        self.manual_gc.after_eval()
        return sum(losses) / len(losses) if self.last_stage else None

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> None:
        """The loop, with the exit-signal handler installed for its duration (main thread)."""
        with self.exit_watch, self.manual_gc:
            try:
                self._train()
            finally:
                if self.saver is not None and self.saver.pending is not None:
                    self.saver.pending.kill()  # an error stopped the run: never publish it
                self.engine.close()

    def _train(self) -> None:
        cfg = self.cfg
        t, log, c = cfg.training, cfg.logging, cfg.checkpoint
        skipped = 0
        last = min(cfg.train_iters, t.exit_interval or cfg.train_iters)
        self._say(
            f"training {self.config.num_layers}-layer GPT (hidden {self.config.hidden_size}, "
            f"vocab {self.config.padded_vocab_size}) on {dist.get_world_size()} ranks: "
            f"TP {ps.get_tensor_model_parallel_world_size()} x PP "
            f"{ps.get_pipeline_model_parallel_world_size()} x CP {self.cp} x DP {self.dp}, "
            f"{self._num_microbatches(t.global_batch_size)} micro-batches of "
            f"{t.micro_batch_size}, iterations {self.iteration}..{last}"
        )
        self._say("placement: " + self._placement())
        start_iteration = self.iteration
        saved_at = self.iteration if c.load else None
        profiler = None
        while self.iteration < last:
            profiler = self._profile(profiler)
            gbs = cfg.batch_size_at(self.consumed)
            n = self._num_microbatches(gbs)
            lr, decoupled_lr = self._lrs()
            self.engine.set_lr(lr, decoupled_lr)
            start = time.perf_counter()
            loss, updated, grad_norm = self.engine.train_step(
                self._micro(self.train_ds, self.consumed, n), n
            )
            step_time = time.perf_counter() - start
            self.iteration += 1
            self.consumed += gbs
            skipped += 0 if updated else 1
            if (
                updated
                and (grad_norm is None or not math.isfinite(grad_norm))
                and not cfg.optimizer.fp16
            ):
                raise TrainingError(
                    f"loss or gradient is NaN/inf at iteration {self.iteration} "
                    f"(grad norm {grad_norm}); stopping. Last checkpoint is untouched."
                )
            self.manual_gc.after_iteration(self.iteration)
            if self.iteration % log.log_interval == 0 or self.iteration == last:
                self._log(loss, lr, grad_norm, skipped, step_time, gbs, self._moe_metrics())
            if (
                log.eval_iters
                and self.valid_ds is not None
                and self.iteration % log.eval_interval == 0
            ):
                value = self.evaluate()
                if self.writer:
                    self.reporter.valid(self.iteration, value)
            self._publish_async(wait=False)
            if c.save and c.save_interval and self.iteration % c.save_interval == 0:
                self.save()
                saved_at = self.iteration
            reason = self.exit_watch.should_exit()  # every rank, every iteration: same answer
            if reason is not None:
                break
        else:
            reason = (
                f"reached --exit-interval {t.exit_interval}"
                if last < cfg.train_iters
                else f"reached the last iteration ({cfg.train_iters})"
            )
        if profiler is not None:
            profiler.__exit__(None, None, None)
        if c.save and saved_at != self.iteration:
            self.save()
        self._publish_async(wait=True)
        self._say(f"stopping at iteration {self.iteration}: {reason}")
        self.reporter.close()
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one line per node: proof it stepped
            print(
                f"node {_node_name()}: rank {self.rank} finished iterations "
                f"{start_iteration + 1}..{self.iteration}",
                flush=True,
            )

    def _profile(self, profiler):
        """--profile: a PyTorch profiler trace of iterations [start, end) on --profile-ranks,
        written as a Chrome trace next to TensorBoard's events (or the working directory)."""
        log = self.cfg.logging
        if not log.profile or self.rank not in log.profile_ranks:
            return None
        step = self.iteration + 1  # the iteration about to run
        if profiler is None and step == log.profile_step_start:
            profiler = torch.profiler.profile(record_shapes=False)
            profiler.__enter__()
        elif profiler is not None and step == log.profile_step_end:
            profiler.__exit__(None, None, None)
            folder = log.tensorboard_dir or "."
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(
                folder, f"profile_rank{self.rank}_iter{log.profile_step_start}.json"
            )
            profiler.export_chrome_trace(path)
            print(f"rank {self.rank}: profiler trace written to {path}", flush=True)
            return None
        return profiler

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

    def _moe_metrics(self) -> dict:
        """This step's MoE metrics of every stage, gathered to every rank of the pipeline
        (collective over the PP group; every rank calls it at a log iteration)."""
        if self.moe is None:
            return {}
        local = self.engine.moe_metrics
        if ps.get_pipeline_model_parallel_world_size() > 1:
            parts: list = [None] * ps.get_pipeline_model_parallel_world_size()
            dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
            local = {k: v for part in parts for k, v in part.items()}
        from megalite.moe.layer import summarize_metrics

        return summarize_metrics(local)

    def _log(self, loss, lr, grad_norm, skipped, step_time, gbs, moe=None) -> None:
        if not self.writer:
            return
        tokens = gbs * self.config.seq_length
        flops = num_floating_point_operations(self.config, gbs, moe=self.moe)
        tflops = flops / step_time / dist.get_world_size() / 1e12
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
        if self.cfg.training.rampup_batch_size is not None:
            record["global_batch_size"] = gbs
        if self.cfg.optimizer.fp16:
            record["loss_scale"] = self.engine.loss_scale()
        if self.cfg.optimizer.log_num_zeros_in_grad:
            record["num_zeros_in_grad"] = self.engine.num_zeros_in_grad
        record.update(moe or {})
        self.reporter.train(record)
