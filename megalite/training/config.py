"""The run's settings: one dataclass per concern, one `RunConfig` holding them all.

Each section is a dataclass whose fields are the flags (see `megalite.config.fields`); the
training CLI is generated from them (`megalite.training.arguments`), a ``--config FILE`` sits
under the command line, and the resolved config is printed at start, saved with every checkpoint
(``meta.json`` and ``config.yaml``, which ``--config`` accepts back) and read by every tool.

Sections: model (`GPTConfig`), moe (`MoEConfig`), parallel (`ParallelConfig`), optimizer
(`OptimizerConfig`),
schedule, training, data (`DataConfig`), checkpoint, logging, and megatron (flags accepted for
compatibility: documented no-ops, or refused with the reason).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from megalite.config import ConfigError, option
from megalite.config.parallel import ParallelConfig
from megalite.data.config import DataConfig
from megalite.data_parallel.optimizer import OptimizerConfig
from megalite.model.config import GPTConfig
from megalite.moe.config import MoEConfig
from megalite.training.exit_signals import ExitConfig


@dataclass
class ScheduleConfig:
    """Learning-rate warm-up and decay, in iterations or (Megatron's *-samples flags) samples."""

    lr_decay_style: str = option(
        "linear", "decay after warm-up", choices=("constant", "linear", "cosine")
    )
    lr_warmup_iters: int = option(0, "linear warm-up iterations")
    lr_warmup_fraction: Optional[float] = option(
        None, "warm-up as a fraction of the decay iterations/samples"
    )
    lr_warmup_samples: int = option(0, "linear warm-up samples (sample-based schedule)")
    lr_decay_iters: Optional[int] = option(None, "iteration where decay ends; default all")
    lr_decay_samples: Optional[int] = option(None, "sample where decay ends (sample-based)")

    def __post_init__(self) -> None:
        if self.lr_warmup_iters < 0 or self.lr_warmup_samples < 0:
            raise ConfigError("--lr-warmup-iters and --lr-warmup-samples must be >= 0")
        if self.lr_warmup_fraction is not None:
            if not 0.0 <= self.lr_warmup_fraction <= 1.0:
                raise ConfigError(
                    f"--lr-warmup-fraction {self.lr_warmup_fraction} must be in [0, 1]"
                )
            if self.lr_warmup_iters or self.lr_warmup_samples:
                raise ConfigError(
                    "--lr-warmup-fraction excludes --lr-warmup-iters / --lr-warmup-samples"
                )


@dataclass
class TrainingConfig:
    """Batch sizes, length of the run and its seed."""

    micro_batch_size: int = option(help="samples per micro-batch per DP rank", required=True)
    global_batch_size: Optional[int] = option(None, "samples per iteration; default mbs x DP")
    rampup_batch_size: Optional[list[int]] = option(
        None, "START INCREMENT SAMPLES: ramp the global batch up over SAMPLES", nargs=3
    )
    train_iters: Optional[int] = option(None, "iterations to train (or --train-samples)")
    train_samples: Optional[int] = option(None, "samples to train (sample-based run)")
    seed: int = option(1234, "seed of weights, data order and dropout")
    exit_interval: Optional[int] = option(None, "stop after this iteration (saving first)")
    calculate_per_token_loss: bool = option(
        False, "loss = sum over tokens / tokens of the global batch (megalite's loss already is)"
    )
    manual_gc: bool = option(
        False, "automatic GC off; collect at start, around eval, after save and every interval"
    )
    manual_gc_interval: int = option(
        0, "iterations between --manual-gc collections (0: only at eval/save)"
    )
    empty_unused_memory_level: int = option(
        0, "empty the CUDA cache: 1 after each forward-backward and eval iteration, 2 also after "
        "each optimizer step", choices=(0, 1, 2),
    )  # fmt: skip

    def __post_init__(self) -> None:
        if (self.train_iters is None) == (self.train_samples is None):
            raise ConfigError("give exactly one of --train-iters and --train-samples")
        for name in ("micro_batch_size", "global_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("train_iters", "train_samples", "manual_gc_interval"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.rampup_batch_size is not None:
            start, inc, samples = self.rampup_batch_size
            if start < 1 or inc < 1 or samples < 0:
                raise ConfigError(
                    f"--rampup-batch-size {start} {inc} {samples}: need start >= 1, "
                    "increment >= 1, samples >= 0"
                )


def _refuse_ddp_flags_under_deepspeed(p: ParallelConfig) -> None:
    """megalite's DDP flags do nothing under DeepSpeed's engine (it reduces gradients itself):
    name each one given and the DeepSpeed config key that does its job."""
    given = []
    if p.grad_reduce_in_bf16:
        given.append('--grad-reduce-in-bf16 (DeepSpeed: "communication_data_type": "bf16")')
    if p.overlap_grad_reduce:
        given.append(
            '--overlap-grad-reduce (DeepSpeed: "zero_optimization": {"overlap_comm": true})'
        )
    if p.ddp_bucket_size is not None:
        given.append(
            f"--ddp-bucket-size {p.ddp_bucket_size} (DeepSpeed: "
            f'"zero_optimization": {{"reduce_bucket_size": {p.ddp_bucket_size}}})'
        )
    if given:
        raise ConfigError(
            f"with --deepspeed, DeepSpeed's engine reduces the gradients and megalite's DDP flags "
            f"would be ignored: drop {'; '.join(given)} and set the key in --deepspeed_config "
            f"{p.deepspeed_config} instead"
        )


@dataclass
class CheckpointConfig:
    """Where and when checkpoints are written, and what is loaded."""

    save: Optional[str] = option(None, "checkpoint directory to write")
    load: Optional[str] = option(None, "checkpoint directory to resume from")
    save_interval: Optional[int] = option(None, "iterations between saves")
    no_load_optim: bool = option(False, "load weights (and position), not the optimizer")
    no_load_rng: bool = option(False, "do not restore RNG states")
    finetune: bool = option(False, "load weights only; iteration and data restart at 0")
    async_save: bool = option(
        False,
        "write checkpoints in the background (a writer thread per rank) while training goes "
        "on; the tracker names a save only once every rank's files are durable",
    )
    ckpt_format: str = option(
        "torch",
        "torch: megalite's per-rank files; torch_dist is refused (megalite-reshard converts "
        "a checkpoint to another layout offline)",
        choices=("torch", "torch_dist"),
    )

    def __post_init__(self) -> None:
        if self.ckpt_format == "torch_dist":
            raise ConfigError(
                "--ckpt-format torch_dist: megalite does not write Megatron's distributed "
                "checkpoint, which reloads at any parallel layout; it writes its own per-rank "
                "files (--ckpt-format torch, the default), which resume at the layout that saved "
                "them. To resume at another TP/PP layout, convert the checkpoint offline with "
                "megalite-reshard"
            )
        if self.save_interval is not None:
            if self.save_interval < 1:
                raise ConfigError(f"--save-interval {self.save_interval} < 1")
            if self.save is None:
                raise ConfigError("--save-interval needs --save DIR")


@dataclass
class LoggingConfig:
    """Log lines, metrics file, TensorBoard, evaluation and profiling."""

    log_interval: int = option(100, "iterations between log lines")
    eval_interval: int = option(1000, "iterations between evaluations")
    eval_iters: int = option(100, "batches per evaluation; 0 turns evaluation off")
    tensorboard_dir: Optional[str] = option(None, "TensorBoard event directory")
    metrics_file: Optional[str] = option(None, "JSON lines, one per logged iteration")
    peak_tflops: Optional[float] = option(None, "per-device peak for MFU (default: by name)")
    log_throughput: bool = option(False, "accepted; throughput and MFU are always logged")
    profile: bool = option(False, "record a PyTorch profiler trace of some steps")
    profile_step_start: int = option(10, "first profiled iteration")
    profile_step_end: int = option(12, "iteration after the last profiled one")
    profile_ranks: list[int] = option(default_factory=lambda: [0], help="ranks that profile")

    def __post_init__(self) -> None:
        for name in ("log_interval", "eval_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.eval_iters < 0:
            raise ConfigError(f"--eval-iters {self.eval_iters} < 0")
        if self.profile and self.profile_step_end <= self.profile_step_start:
            raise ConfigError(
                f"--profile-step-end {self.profile_step_end} must exceed --profile-step-start "
                f"{self.profile_step_start}"
            )


# Megatron kernels with no counterpart here: accepted, and they change nothing.
NOOP_HELP = "accepted for Megatron-LM compatibility; selects a kernel megalite does not have"


@dataclass
class MegatronCompatConfig:
    """Megatron-LM flags that only pick a kernel (no-ops here), or that cannot be honoured."""

    use_mcore_models: bool = option(False, NOOP_HELP)
    attention_backend: str = option(
        "auto", NOOP_HELP + " (torch SDPA)", choices=("auto", "flash", "fused", "unfused", "local")
    )
    cross_entropy_loss_fusion: bool = option(False, NOOP_HELP)
    no_masked_softmax_fusion: bool = option(False, NOOP_HELP)
    no_bias_gelu_fusion: bool = option(False, NOOP_HELP)
    no_bias_swiglu_fusion: bool = option(False, NOOP_HELP)
    no_bias_dropout_fusion: bool = option(False, NOOP_HELP)
    no_rope_fusion: bool = option(False, NOOP_HELP)
    no_gradient_accumulation_fusion: bool = option(False, NOOP_HELP)
    use_flash_attn: bool = option(False, NOOP_HELP)
    transformer_impl: str = option(
        "local",
        "local (megalite's layers); transformer_engine is refused",
        choices=("local", "transformer_engine"),
    )
    fp8_format: Optional[str] = option(None, "refused: fp8 needs Transformer Engine on a GPU")
    fp8_amax_history_len: Optional[int] = option(None, "refused with --fp8-format")
    fp8_amax_compute_algo: Optional[str] = option(None, "refused with --fp8-format")
    fp8_param_gather: bool = option(False, "refused with --fp8-format")

    def __post_init__(self) -> None:
        fp8 = [
            f"--{n.replace('_', '-')}"
            for n in ("fp8_format", "fp8_amax_history_len", "fp8_amax_compute_algo")
            if getattr(self, n) is not None
        ] + (["--fp8-param-gather"] if self.fp8_param_gather else [])
        if fp8:
            raise ConfigError(
                f"{' '.join(fp8)}: fp8 training needs NVIDIA Transformer Engine on a GPU, which "
                "megalite does not use; train in --bf16 instead"
            )
        if self.transformer_impl == "transformer_engine":
            raise ConfigError(
                "--transformer-impl transformer_engine: megalite has its own layers and does not "
                "use Transformer Engine; drop the flag (local is the default)"
            )


SECTIONS: dict[str, type] = {
    "model": GPTConfig,
    "moe": MoEConfig,
    "parallel": ParallelConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "exit": ExitConfig,
    "megatron": MegatronCompatConfig,
}


def section_of_field() -> dict[str, str]:
    """{field name: section} over every CLI field; field names are unique across sections."""
    from megalite.config.fields import cli_fields

    out: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in cli_fields(cls):
            if f.name in out:
                raise AssertionError(f"field {f.name} is in {out[f.name]} and {section}")
            out[f.name] = section
    return out


@dataclass
class RunConfig:
    """Every setting of one training run, and what follows from them at a world size."""

    model: GPTConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    training: TrainingConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    megatron: MegatronCompatConfig
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    exit: ExitConfig = dataclasses.field(default_factory=ExitConfig)
    # Derived at a world size by `resolve` (not settings; recomputed on every start).
    world_size: int = 0
    data_parallel_size: int = 0

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SECTIONS}

    # --- derived values ----------------------------------------------------------------------
    def resolve(self, world_size: int) -> RunConfig:
        """Check everything that needs the world size; fill the batch-size defaults."""
        from megalite.parallel_state import LayoutError, validate_layout

        p, t = self.parallel, self.training
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        try:
            dp = validate_layout(world_size, tp, pp, p.context_parallel_size)
        except LayoutError as e:
            raise ConfigError(
                f"--tensor-model-parallel-size/--pipeline-model-parallel-size: {e}"
            ) from None
        self.world_size, self.data_parallel_size = world_size, dp
        self.model_config(vocab_size=None)  # the model's own layout checks, naming numbers
        self._check_moe(world_size)
        mbs = t.micro_batch_size
        if t.global_batch_size is None:
            t.global_batch_size = mbs * dp
        for gbs, what in self._batch_sizes():
            if gbs % (mbs * dp) != 0:
                raise ConfigError(
                    f"{what} {gbs} must equal --micro-batch-size {mbs} x data-parallel size "
                    f"{dp} x gradient-accumulation steps; {gbs} is not a multiple of {mbs} x "
                    f"{dp} = {mbs * dp}"
                )
            if p.num_layers_per_virtual_pipeline_stage is not None and (gbs // (mbs * dp)) % pp:
                raise ConfigError(
                    f"the interleaved schedule needs the number of micro-batches "
                    f"({gbs // (mbs * dp)} = {what} {gbs} / (--micro-batch-size {mbs}"
                    f" x DP {dp})) to be a multiple of --pipeline-model-parallel-size {pp}"
                )
        if p.deepspeed:
            if self.optimizer.zero_stage:
                raise ConfigError(
                    "--zero-stage/--use-distributed-optimizer is megalite's own ZeRO; with "
                    "--deepspeed set the ZeRO stage in the DeepSpeed config instead"
                )
            if t.rampup_batch_size is not None:
                raise ConfigError("--rampup-batch-size is not supported with --deepspeed")
            _refuse_ddp_flags_under_deepspeed(p)
            if self.optimizer.log_num_zeros_in_grad:
                raise ConfigError(
                    "--log-num-zeros-in-grad counts the zeros in megalite's own optimizer; "
                    "DeepSpeed's engine does not report them: drop the flag with --deepspeed"
                )
        return self

    def _check_moe(self, world_size: int) -> None:
        from megalite.moe.training import check_moe_setup

        p, m = self.parallel, self.moe
        check_moe_setup(
            m, world_size=world_size, tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size, deepspeed=p.deepspeed,
            sequence_parallel=p.sequence_parallel, seq_length=self.model.seq_length,
            num_layers=self.model.num_layers, ffn_hidden_size=self.model.ffn_hidden_size,
        )  # fmt: skip

    def _batch_sizes(self) -> list[tuple[int, str]]:
        t = self.training
        out = [(t.global_batch_size, "--global-batch-size")]
        if t.rampup_batch_size is not None:
            start, inc, _ = t.rampup_batch_size
            if (t.global_batch_size - start) % inc != 0 or start > t.global_batch_size:
                raise ConfigError(
                    f"--rampup-batch-size {start} {inc}: --global-batch-size "
                    f"{t.global_batch_size} - start {start} is not a multiple of the increment"
                )
            out += [(b, "--rampup-batch-size step") for b in range(start, t.global_batch_size, inc)]
        return out

    def model_config(self, vocab_size: Optional[int]) -> GPTConfig:
        """The model the run builds: the model section with its split, dtype and vocabulary."""
        return dataclasses.replace(
            self.model,
            vocab_size=vocab_size,
            params_dtype=self.optimizer.params_dtype,
            **self.parallel.model_split(),
        )

    def batch_size_at(self, consumed_samples: int) -> int:
        """The global batch of the iteration that starts at `consumed_samples` (ramp-up aware).

        Megatron's rule: the batch grows by INCREMENT every SAMPLES / #increments samples until
        it reaches --global-batch-size.
        """
        t = self.training
        if t.rampup_batch_size is None:
            return t.global_batch_size
        start, inc, ramp = t.rampup_batch_size
        steps = (t.global_batch_size - start) // inc
        if steps == 0 or consumed_samples >= ramp:
            return t.global_batch_size
        per_step = ramp / steps
        return min(start + int(consumed_samples / per_step) * inc, t.global_batch_size)

    @property
    def train_iters(self) -> int:
        """Iterations of the run (from --train-samples when the run counts samples)."""
        t = self.training
        if t.train_iters is not None:
            return t.train_iters
        iterations, consumed = 0, 0
        while consumed < t.train_samples and self.batch_size_at(consumed) != t.global_batch_size:
            consumed += self.batch_size_at(consumed)
            iterations += 1
        rest = max(t.train_samples - consumed, 0)
        return iterations + -(-rest // t.global_batch_size)

    @property
    def sample_based(self) -> bool:
        return self.training.train_samples is not None

    def lr_schedules(self):
        """(schedule of the main groups, schedule of the --decoupled-lr groups or None)."""
        from megalite.training.lr_schedule import LRSchedule

        s, o = self.schedule, self.optimizer
        if self.sample_based:
            decay = s.lr_decay_samples or self.training.train_samples
            warmup = s.lr_warmup_samples
        else:
            decay = s.lr_decay_iters if s.lr_decay_iters is not None else self.train_iters
            warmup = s.lr_warmup_iters
        if s.lr_warmup_fraction is not None:
            warmup = int(s.lr_warmup_fraction * decay)
        main = LRSchedule(o.lr, o.min_lr, warmup, decay, s.lr_decay_style)
        decoupled = None
        if o.decoupled_lr is not None:
            floor = o.decoupled_min_lr if o.decoupled_min_lr is not None else o.min_lr
            decoupled = LRSchedule(o.decoupled_lr, floor, warmup, decay, s.lr_decay_style)
        return main, decoupled
