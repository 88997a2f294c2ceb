"""Command-line flags of `megalite-pretrain`: Megatron-LM's names, checked before any work.

argparse lives only here. `parse_args(argv)` returns a namespace; `validate_args(args, world)`
derives the data-parallel size and the number of micro-batches and refuses every inconsistent
combination with a message naming the flags and numbers. The config dataclasses of the model,
the optimizer and the data are built from the namespace in `megalite.training.setup`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional


class ArgumentError(ValueError):
    """A flag value that cannot work; the message names the flag(s)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + exits 2; keep that, clearer
        if "unrecognized arguments" in message:
            message = message.replace("unrecognized arguments", "unknown flag(s)")
            message += " (see megalite-pretrain --help for the supported Megatron-LM flags)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="megalite-pretrain",
        description="Pretrain a GPT model with tensor, pipeline and data (ZeRO) parallelism.",
        allow_abbrev=False,
    )
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        help="layers per model chunk; enables the interleaved 1F1B schedule",
    )
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None)
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    g.add_argument(
        "--zero-stage",
        type=int,
        choices=[0, 1, 2],
        default=None,
        help="megalite's own ZeRO without DeepSpeed (1: optimizer state, 2: + gradients)",
    )
    g.add_argument(
        "--use-distributed-optimizer", action="store_true", help="same as --zero-stage 1"
    )
    g.add_argument("--ddp-bucket-size", type=int, default=None, help="elements per grad bucket")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--deepspeed", action="store_true", help="train through the DeepSpeed engine")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument(
        "--position-embedding-type",
        choices=["learned_absolute", "rope"],
        default="learned_absolute",
    )
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="static scale (fp16)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 turns clipping off")

    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="PREFIX, or weighted: W1 PREFIX1 W2 PREFIX2 ...",
    )
    g.add_argument(
        "--mock-data",
        action="store_true",
        help="synthetic, learnable token sequences (needs --vocab-size)",
    )
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument(
        "--tokenizer-type",
        default="NullTokenizer",
        choices=[
            "SentencePieceTokenizer",
            "HuggingFaceTokenizer",
            "GPT2BPETokenizer",
            "NullTokenizer",
        ],
    )
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="with NullTokenizer")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument(
        "--finetune",
        action="store_true",
        help="load weights only; iteration and data position start at 0",
    )

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100, help="0 turns evaluation off")
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None, help="JSON lines, one per logged iteration")
    g.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="per-device peak for MFU (default: looked up from the device name)",
    )
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ArgumentError(message)


def validate_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Derive sizes and refuse inconsistent flags; returns `args` with derived fields added.

    Adds: data_parallel_size, num_microbatches, virtual_pipeline_model_parallel_size,
    zero_stage (resolved), ffn_hidden_size, max_position_embeddings, lr_decay_iters.
    """
    from megalite.parallel_state import LayoutError, validate_layout

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    try:
        dp = validate_layout(world_size, tp, pp)
    except LayoutError as e:
        raise ArgumentError(
            f"--tensor-model-parallel-size/--pipeline-model-parallel-size: {e}"
        ) from None
    args.data_parallel_size = dp
    args.world_size = world_size

    for flag in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "seq_length",
        "micro_batch_size",
        "train_iters",
    ):
        value = getattr(args, flag)
        _need(
            value >= 1 if flag != "train_iters" else value >= 0,
            f"--{flag.replace('_', '-')} must be positive, got {value}",
        )
    _need(args.lr >= 0 and args.min_lr >= 0, f"--lr {args.lr} / --min-lr {args.min_lr} < 0")
    _need(args.min_lr <= args.lr, f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    _need(not (args.bf16 and args.fp16), "--bf16 and --fp16 are mutually exclusive")

    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    mbs, gbs = args.micro_batch_size, args.global_batch_size
    _need(
        gbs % (mbs * dp) == 0,
        f"--global-batch-size {gbs} must equal --micro-batch-size {mbs} x data-parallel size "
        f"{dp} x gradient-accumulation steps; {gbs} is not a multiple of {mbs} x {dp} = {mbs * dp}",
    )
    args.num_microbatches = gbs // (mbs * dp)

    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per = args.num_layers_per_virtual_pipeline_stage
        _need(
            pp > 1,
            "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1",
        )
        _need(
            per >= 1 and args.num_layers % (per * pp) == 0,
            f"--num-layers {args.num_layers} is not divisible by "
            f"--num-layers-per-virtual-pipeline-stage {per} x "
            f"--pipeline-model-parallel-size {pp}",
        )
        args.virtual_pipeline_model_parallel_size = args.num_layers // (per * pp)
        _need(
            args.num_microbatches % pp == 0,
            f"the interleaved schedule needs the number of micro-batches "
            f"({args.num_microbatches} = --global-batch-size {gbs} / (--micro-batch-size {mbs}"
            f" x DP {dp})) to be a multiple of --pipeline-model-parallel-size {pp}",
        )
    else:
        _need(
            args.num_layers % pp == 0,
            f"--num-layers {args.num_layers} is not divisible by "
            f"--pipeline-model-parallel-size {pp}",
        )
    _need(
        args.hidden_size % args.num_attention_heads == 0,
        f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
        f"{args.num_attention_heads}",
    )
    _need(
        args.num_attention_heads % tp == 0,
        f"--num-attention-heads {args.num_attention_heads} is not divisible by "
        f"--tensor-model-parallel-size {tp}",
    )
    if args.num_query_groups is not None:
        g = args.num_query_groups
        _need(
            args.num_attention_heads % g == 0 and g % tp == 0,
            f"--num-query-groups {g} must divide --num-attention-heads "
            f"{args.num_attention_heads} and be divisible by --tensor-model-parallel-size {tp}",
        )
    if args.sequence_parallel:
        _need(
            args.seq_length % tp == 0,
            f"--sequence-parallel needs --seq-length {args.seq_length} divisible by "
            f"--tensor-model-parallel-size {tp}",
        )
        if tp == 1:
            args.sequence_parallel = False  # nothing to split (Megatron does the same)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
        if args.swiglu:  # keep the parameter count of a 4h GeLU MLP, as Megatron does
            args.ffn_hidden_size = (
                int(2 * 4 * args.hidden_size / 3 / 64) * 64 or 4 * args.hidden_size
            )
    _need(
        args.ffn_hidden_size % tp == 0,
        f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by "
        f"--tensor-model-parallel-size {tp}",
    )
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    _need(
        args.max_position_embeddings >= args.seq_length,
        f"--max-position-embeddings {args.max_position_embeddings} < --seq-length "
        f"{args.seq_length}",
    )
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    _need(args.lr_warmup_iters >= 0, f"--lr-warmup-iters {args.lr_warmup_iters} < 0")

    zero = args.zero_stage
    if args.use_distributed_optimizer:
        _need(zero in (None, 1, 2), "--use-distributed-optimizer conflicts with --zero-stage 0")
        zero = zero or 1
    args.zero_stage = zero or 0
    if args.deepspeed:
        _need(args.deepspeed_config is not None, "--deepspeed needs --deepspeed_config FILE")
        # refused before any step rather than at the first save, when the work would be lost
        _need(
            args.save is None,
            "--save with --deepspeed is not supported: DeepSpeed's "
            "checkpoints need full unpickling; train with --zero-stage 1|2 to save",
        )
        _need(
            args.zero_stage == 0,
            "--zero-stage/--use-distributed-optimizer is megalite's own "
            "ZeRO; with --deepspeed set the ZeRO stage in the DeepSpeed config instead",
        )

    _need(
        args.data_path is not None or args.mock_data,
        "give --data-path PREFIX (or --mock-data for synthetic tokens)",
    )
    _need(not (args.data_path and args.mock_data), "--data-path and --mock-data exclude each other")
    if args.vocab_size is not None:
        _need(args.vocab_size >= 2, f"--vocab-size {args.vocab_size} must be >= 2")
    if args.tokenizer_type == "NullTokenizer":
        _need(args.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    if args.save_interval is not None:
        _need(args.save_interval >= 1, f"--save-interval {args.save_interval} < 1")
        _need(args.save is not None, "--save-interval needs --save DIR")
    for flag in ("log_interval", "eval_interval"):
        _need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be >= 1")
    _need(args.eval_iters >= 0, f"--eval-iters {args.eval_iters} < 0")
    return args
