"""`megalite-check` / `python -m megalite.check`: the same tiny run at every layout, one table.

Trains one small GPT (same seed, same mock data, dropout off) for N iterations at each requested
layout, spawning the ranks itself (one process per rank on this machine, gloo, or NCCL when there
is a GPU per rank), and compares the loss of every iteration with a one-process run::

    megalite-check --all                         # the standard matrix (below), ~5 min on 2 cores
    megalite-check tp2 pp2vp2 tp2pp2dp2z1        # chosen layouts
    megalite-check --hidden-size 64 tp4 -- --swiglu --normalization RMSNorm   # any model flags

Layout syntax: parts glued together in any order, each size defaulting to 1::

    tpN   tensor-parallel size          ppN   pipeline stages       vpN  model chunks per stage
    dpN   data-parallel size            zN    megalite ZeRO stage   dsN  DeepSpeed ZeRO stage
    cpN   context-parallel size         ulysses  all-to-all CP attention (default: ring)
    sp    sequence parallelism          bf16  bf16 (compared with a one-process bf16 run)
    epN   MoE (4 experts, top-2, aux and z losses) split over N expert-parallel ranks; the
          reference is the one-process MoE model      a2a  the all-to-all token dispatcher
    1     the one-process layout itself

so ``tp2pp2dp2z1`` is 8 ranks, ``dp2ds3`` DeepSpeed ZeRO-3 over 2 ranks. Exit status 0 when every
layout ran and stayed within the tolerance (relative to the one-process loss, every iteration),
1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# The parity matrix: every parallel dimension alone, then their combinations.
STANDARD_MATRIX = (
    "tp2 tp4 tp2sp pp2 pp4 pp2vp2 dp2 dp2z1 dp2z2 tp2pp2 tp2dp2 pp2dp2 tp2pp2dp2z1 "
    "dp2ds1 dp2ds2 dp2ds3 tp2pp2bf16 dp2ep2 tp2dp2ep2sp pp2dp2ep2z1a2a "
    "cp2 cp4 cp2ulysses tp2cp2sp pp2cp2 cp2dp2z1 cp2dp2ep2z1"
).split()
# The MoE of the ep layouts: small enough for the tiny model, every loss term on.
MOE_FLAGS = (
    "--num-experts=4 --moe-router-topk=2 --moe-aux-loss-coeff=1e-2 --moe-z-loss-coeff=1e-3"
).split()
FP32_TOLERANCE = 1e-5
# bf16 keeps 8 mantissa bits: TP splits the sums and rounds partial products differently, so a
# layout moves the loss by bf16 round-off, not fp32's. The bound is about half a bf16 ulp (2^-9);
# the tiny model at tp2pp2 deviates by 7e-5 over 10 iterations.
BF16_TOLERANCE = 2e-3
_PART = re.compile(r"(tp|pp|vp|dp|ds|z|ep|cp)(\d+)|(sp)|(bf16)|(a2a)|(ulysses)")


class LayoutSyntaxError(ValueError):
    """A layout string that does not parse or cannot run; the message says which part."""


@dataclass(frozen=True)
class Layout:
    """One parallel layout of the check (sizes as in `megalite-pretrain`'s flags)."""

    tp: int = 1
    """tensor-model-parallel size"""
    pp: int = 1
    """pipeline-model-parallel size"""
    vp: int = 1
    """model chunks per pipeline stage (interleaved 1F1B when > 1)"""
    dp: int = 1
    """data-parallel size"""
    sp: bool = False
    """sequence parallelism (needs tp > 1)"""
    zero: int = 0
    """megalite's own ZeRO stage (0-2)"""
    ds: Optional[int] = None
    """DeepSpeed ZeRO stage (0-3); None: megalite's DDP/optimizer"""
    bf16: bool = False
    """train in bf16 instead of fp32"""
    ep: Optional[int] = None
    """MoE with this expert-model-parallel size; None: the dense model"""
    a2a: bool = False
    """MoE with the all-to-all token dispatcher (default all-gather)"""
    cp: int = 1
    """context-parallel size"""
    ulysses: bool = False
    """all-to-all context-parallel attention (--cp-comm-type a2a; needs cp > 1)"""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def name(self) -> str:
        parts = [f"{k}{v}" for k, v in (("tp", self.tp), ("pp", self.pp)) if v > 1]
        parts += [f"vp{self.vp}"] if self.vp > 1 else []
        parts += [f"cp{self.cp}"] if self.cp > 1 else []
        parts += ["ulysses"] if self.ulysses else []
        parts += [f"dp{self.dp}"] if self.dp > 1 else []
        parts += [f"ep{self.ep}"] if self.ep is not None else []
        parts += ["sp"] if self.sp else []
        parts += [f"z{self.zero}"] if self.zero else []
        parts += [f"ds{self.ds}"] if self.ds is not None else []
        parts += ["bf16"] if self.bf16 else []
        parts += ["a2a"] if self.a2a else []
        return "".join(parts) or "1"

    def reference(self) -> Layout:
        """The one-process layout this one is compared with (same precision, same model)."""
        return Layout(bf16=self.bf16, ep=None if self.ep is None else 1)


def parse_layout(text: str) -> Layout:
    """``"tp2pp2dp2z1"`` -> Layout(tp=2, pp=2, dp=2, zero=1); see the module docstring."""
    s = text.strip().lower()
    if s in ("1", "single"):
        return Layout()
    values: dict = {}
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise LayoutSyntaxError(
                f"layout {text!r}: cannot read {s[pos:]!r} "
                "(parts: tpN ppN vpN cpN dpN epN zN dsN sp bf16 a2a ulysses)"
            )
        key = m.group(1) or m.group(3) or m.group(4) or m.group(5) or m.group(6)
        if key in values:
            raise LayoutSyntaxError(f"layout {text!r}: {key} given twice")
        values[key] = int(m.group(2)) if m.group(2) is not None else True
        pos = m.end()
    layout = Layout(
        tp=values.get("tp", 1),
        pp=values.get("pp", 1),
        vp=values.get("vp", 1),
        dp=values.get("dp", 1),
        sp=values.get("sp", False),
        zero=values.get("z", 0),
        ds=values.get("ds"),
        bf16=values.get("bf16", False),
        cp=values.get("cp", 1),
        ulysses=values.get("ulysses", False),
        ep=values.get("ep"),
        a2a=values.get("a2a", False),
    )
    problems = [f"{k} must be >= 1" for k in ("tp", "pp", "vp", "dp", "cp") if values.get(k, 1) < 1]
    problems += ["ulysses needs cp > 1"] if layout.ulysses and layout.cp == 1 else []
    problems += ["z must be 0, 1 or 2"] if layout.zero > 2 else []
    problems += ["ds must be 0-3"] if layout.ds is not None and layout.ds > 3 else []
    problems += ["sp needs tp > 1"] if layout.sp and layout.tp == 1 else []
    problems += ["vp needs pp > 1"] if layout.vp > 1 and layout.pp == 1 else []
    problems += ["ep must be >= 1"] if layout.ep is not None and layout.ep < 1 else []
    problems += ["a2a needs ep"] if layout.a2a and layout.ep is None else []
    problems += ["MoE (ep) runs without DeepSpeed"] if layout.ep and layout.ds is not None else []
    problems += ["z and ds exclude each other"] if layout.zero and layout.ds is not None else []
    problems += (
        ["DeepSpeed (ds) runs with pp1 only"] if layout.ds is not None and layout.pp > 1 else []
    )
    if problems:
        raise LayoutSyntaxError(f"layout {text!r}: " + "; ".join(problems))
    return layout


@dataclass
class ModelSpec:
    """The model and batch every layout trains (Megatron flag names)."""

    num_layers: int = 4
    hidden_size: int = 32
    num_attention_heads: int = 4
    seq_length: int = 16
    vocab_size: int = 128
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_iters: int = 10
    lr: float = 1e-3
    seed: int = 1234
    extra: list[str] = field(default_factory=list)
    """further `megalite-pretrain` flags, the same for every layout (and the reference)"""


def pretrain_argv(layout: Layout, spec: ModelSpec, workdir: Path) -> list[str]:
    """`megalite-pretrain` flags of one layout's run; writes its DeepSpeed config into workdir.

    The vocabulary keeps Megatron's padding to a multiple of 128 x TP: TP=1, 2, 4 pad 128 tokens
    to 128, 256, 512 rows, and the padding must not change the model (its logits are -inf).
    """
    argv = [
        f"--num-layers={spec.num_layers}", f"--hidden-size={spec.hidden_size}",
        f"--num-attention-heads={spec.num_attention_heads}", f"--seq-length={spec.seq_length}",
        f"--vocab-size={spec.vocab_size}", "--mock-data",
        f"--micro-batch-size={spec.micro_batch_size}",
        f"--global-batch-size={spec.global_batch_size}", f"--train-iters={spec.train_iters}",
        f"--lr={spec.lr}", f"--seed={spec.seed}", "--hidden-dropout=0", "--attention-dropout=0",
        "--eval-iters=0", "--log-interval=1",
        f"--tensor-model-parallel-size={layout.tp}", f"--pipeline-model-parallel-size={layout.pp}",
    ]  # fmt: skip
    if layout.vp > 1:
        per_chunk, rest = divmod(spec.num_layers, layout.pp * layout.vp)
        if rest or per_chunk == 0:
            raise LayoutSyntaxError(
                f"layout {layout.name}: {spec.num_layers} layers do not split into "
                f"pp{layout.pp} x vp{layout.vp} chunks"
            )
        argv.append(f"--num-layers-per-virtual-pipeline-stage={per_chunk}")
    argv += ["--sequence-parallel"] if layout.sp else []
    argv += [f"--context-parallel-size={layout.cp}"] if layout.cp > 1 else []
    argv += ["--cp-comm-type=a2a"] if layout.ulysses else []
    argv += [f"--zero-stage={layout.zero}"] if layout.zero else []
    argv += ["--bf16"] if layout.bf16 else []
    if layout.ep is not None:
        argv += MOE_FLAGS + [f"--expert-model-parallel-size={layout.ep}"]
        argv += ["--moe-token-dispatcher-type=alltoall"] if layout.a2a else []
    if layout.ds is not None:
        zero: dict = {"stage": layout.ds}
        if layout.ds == 3:  # partition even a tiny model's parameters (default keeps them whole)
            zero["stage3_param_persistence_threshold"] = 0
        config = {"zero_optimization": zero, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9}  # fmt: skip
        path = workdir / f"ds_zero{layout.ds}.json"
        path.write_text(json.dumps(config, indent=1))
        argv += ["--deepspeed", f"--deepspeed_config={path}"]
    return argv + list(spec.extra)


def preflight(layouts: Sequence[Layout], spec: ModelSpec, workdir: Path) -> list[str]:
    """Every layout's flags through megalite-pretrain's own validation, before any rank starts:
    a layout that cannot run (heads or batch not divisible, ...) is named up front."""
    from megalite.config import ConfigError
    from megalite.training.arguments import resolved_config

    problems = []
    for lay in layouts:
        folder = workdir / lay.name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            resolved_config(pretrain_argv(lay, spec, folder), lay.world_size)
        except (LayoutSyntaxError, ConfigError) as e:
            problems.append(f"{lay.name}: {e}")
    return problems


def read_losses(metrics_file: Path) -> list[float]:
    """Training `lm_loss` per iteration from a `--metrics-file` (validation lines skipped)."""
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    train = [r for r in records if r.get("split", "train") == "train"]
    return [float("nan") if r["lm_loss"] is None else r["lm_loss"] for r in train]


def read_grad_norms(metrics_file: Path) -> list[float]:
    """Training `grad_norm` per iteration: compared as well as the losses, because AdamW hides a
    uniform gradient-scale bug (a sum instead of a mean over DP) from the loss."""
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    train = [r for r in records if r.get("split", "train") == "train"]
    return [float("nan") if r.get("grad_norm") is None else r["grad_norm"] for r in train]


def read_step_time(metrics_file: Path) -> Optional[float]:
    """Median `step_time_s` past the first (warm-up) iteration."""
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    times = [r["step_time_s"] for r in records if "step_time_s" in r]
    return statistics.median(times[1:] or times) if times else None


def max_relative_deviation(reference: Sequence[float], losses: Sequence[float]) -> float:
    """max_i |loss_i - ref_i| / |ref_i|; inf when the runs differ in length or went non-finite."""
    if len(reference) != len(losses) or not reference:
        return float("inf")
    worst = 0.0
    for ref, got in zip(reference, losses):
        dev = abs(got - ref) / max(abs(ref), 1e-12)
        if dev != dev:  # NaN
            return float("inf")
        worst = max(worst, dev)
    return worst


def rank_env(rank: int, world_size: int, port: int, base: Optional[dict] = None) -> dict:
    """The environment of one rank, as torchrun would set it (megalite.distributed reads it)."""
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks on one box must not each take every core
    env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_count() else "cuda")
    return env


def spawn_ranks(
    world_size: int, argv: Sequence[str], logdir: Path, env: Optional[dict] = None
) -> list[subprocess.Popen]:
    """Start `megalite-pretrain argv` as `world_size` independent processes, one per rank.

    No launcher watches them (unlike torchrun, which kills the others when one dies), so what
    each rank does on a failure is megalite's own behaviour. Output goes to logdir/rankN.log.
    """
    from megalite.distributed import free_port

    port = free_port()
    logdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world_size):
        log = open(logdir / f"rank{rank}.log", "w")  # noqa: SIM115 (closed by the child's exit)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "megalite.pretrain", *argv],
                env=rank_env(rank, world_size, port, env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float, grace: float = 10.0) -> list[int]:
    """Exit codes; after `timeout` (or `grace` s after a rank failed) the rest are killed (-9)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.returncode not in (None, 0) for p in procs)
        if failed:
            deadline = min(deadline, time.monotonic() + grace)
        if time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    return [p.wait() for p in procs]


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


@dataclass
class Result:
    """One layout's run."""

    layout: Layout
    losses: list[float]
    step_time: Optional[float]
    error: Optional[str] = None
    deviation: Optional[float] = None
    grad_norms: list[float] = dataclasses.field(default_factory=list)
    norm_deviation: Optional[float] = None

    def worst(self) -> Optional[float]:
        """The larger relative deviation of the two curves (losses, grad norms)."""
        values = [d for d in (self.deviation, self.norm_deviation) if d is not None]
        return max(values) if values else None


def run_layout(
    layout: Layout, spec: ModelSpec, workdir: Path, timeout: float, backend: str
) -> Result:
    """Train `spec` at `layout` on freshly spawned ranks and read back its losses."""
    folder = workdir / layout.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    metrics = folder / "metrics.jsonl"
    argv = pretrain_argv(layout, spec, folder)
    argv += [f"--metrics-file={metrics}", "--distributed-timeout-minutes=1"]
    argv.append(f"--distributed-backend={backend}")
    codes = wait_all(spawn_ranks(layout.world_size, argv, folder), timeout)
    if any(codes) or not metrics.exists():
        why = f"exit codes {codes}" if any(codes) else "no metrics written"
        tail = _log_tail(folder, codes)
        return Result(layout, [], None, f"{why}; see {folder}{tail}")
    return Result(
        layout, read_losses(metrics), read_step_time(metrics), grad_norms=read_grad_norms(metrics)
    )


def _log_tail(folder: Path, codes: list[int]) -> str:
    bad = [r for r, c in enumerate(codes) if c] or [0]
    lines = (folder / f"rank{bad[0]}.log").read_text(errors="replace").splitlines()
    errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return f"\n    rank {bad[0]}: " + (
        errors[-1] if errors else (lines[-1] if lines else "(empty)")
    )


def format_table(results: list[Result], tolerances: dict[bool, float]) -> str:
    """The report: one row per layout, reference rows first."""
    head = f"{'layout':<14}{'ranks':>6}{'final loss':>14}{'max rel dev':>13}{'grad-norm dev':>15}"
    head += f"{'tolerance':>11}"
    head += f"{'step ms':>10}  result"
    rows = [head, "-" * len(head)]
    for r in results:
        final = f"{r.losses[-1]:.6f}" if r.losses else "-"
        step = f"{r.step_time * 1000:.1f}" if r.step_time is not None else "-"
        if r.error:
            dev, ndev, tol, verdict = "-", "-", "-", "FAILED"
        elif r.deviation is None:
            dev, ndev, tol, verdict = "reference", "", "", "ok"
        else:
            limit = tolerances[r.layout.bf16]
            dev, tol = f"{r.deviation:.2e}", f"{limit:.0e}"
            ndev = f"{r.norm_deviation:.2e}" if r.norm_deviation is not None else "-"
            verdict = "ok" if r.worst() <= limit else "DEVIATES"
        rows.append(
            f"{r.layout.name:<14}{r.layout.world_size:>6}{final:>14}{dev:>13}{ndev:>15}"
            f"{tol:>11}{step:>10}  {verdict}"
        )
        if r.error:
            rows.append(f"    {r.error}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite-check",
        description="Train one tiny GPT at each layout and compare every iteration's loss with "
        "the one-process run. Flags after `--` go to megalite-pretrain for every run.",
        epilog="layouts: " + __doc__.split("Layout syntax:")[1].split("Exit status")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("layouts", nargs="*", help="e.g. tp2 pp2vp2 tp2pp2dp2z1 dp2ds3 tp2pp2bf16")
    p.add_argument(
        "--all", action="store_true", help="the standard matrix: " + " ".join(STANDARD_MATRIX)
    )
    spec = ModelSpec()
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                 "micro_batch_size", "global_batch_size", "seed"):  # fmt: skip
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(spec, name))
    p.add_argument("--iters", type=int, default=spec.train_iters, help="iterations compared")
    p.add_argument("--lr", type=float, default=spec.lr)
    p.add_argument("--tolerance", type=float, default=FP32_TOLERANCE, help="fp32 max rel dev")
    p.add_argument("--bf16-tolerance", type=float, default=BF16_TOLERANCE)
    p.add_argument(
        "--backend",
        choices=["gloo", "nccl"],
        default=None,
        help="default: nccl with a GPU per rank of the largest layout, else gloo",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per layout")
    p.add_argument("--workdir", default=None, help="keep every run's logs and metrics here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    a = parser.parse_args(argv)
    names = list(STANDARD_MATRIX if a.all else []) + a.layouts
    if not names:
        parser.error("name some layouts (e.g. tp2 pp2 dp2z1) or pass --all")
    spec = ModelSpec(
        a.num_layers, a.hidden_size, a.num_attention_heads, a.seq_length, a.vocab_size,
        a.micro_batch_size, a.global_batch_size, a.iters, a.lr, a.seed, extra,
    )  # fmt: skip
    try:
        layouts = list(dict.fromkeys(parse_layout(n) for n in names))
    except LayoutSyntaxError as e:
        parser.error(str(e))
    references = list(dict.fromkeys(lay.reference() for lay in layouts))
    layouts = [lay for lay in layouts if lay not in references]
    tolerances = {False: a.tolerance, True: a.bf16_tolerance}
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="megalite-check-"))
    problems = preflight(references + layouts, spec, workdir)
    if problems:
        parser.error("layouts that cannot run this model:\n  " + "\n  ".join(problems))
    # One backend for every run, reference included: NCCL needs a GPU per rank of the largest
    # layout, and CPU and GPU runs would differ by more than round-off.
    world = max(lay.world_size for lay in references + layouts)
    backend = a.backend or ("nccl" if _cuda_count() >= world else "gloo")
    start = time.monotonic()
    print(
        f"megalite-check: {len(layouts)} layouts x {spec.train_iters} iterations, "
        f"{spec.num_layers}-layer GPT hidden {spec.hidden_size}, {backend}; runs in {workdir}",
        flush=True,
    )
    results, refs = [], {}
    for lay in references + layouts:
        r = run_layout(lay, spec, workdir, a.timeout, backend)
        if lay in references:
            refs[lay] = r
        else:
            ref = refs[lay.reference()]
            if ref.error and not r.error:
                r.error = f"no reference: the one-process run {ref.layout.name} failed"
            elif not r.error:
                r.deviation = max_relative_deviation(ref.losses, r.losses)
                r.norm_deviation = max_relative_deviation(ref.grad_norms, r.grad_norms)
        results.append(r)
        print(f"  {lay.name:<14} done ({time.monotonic() - start:.0f} s)", flush=True)
    print(format_table(results, tolerances))
    bad = [r for r in results if r.error or (r.worst() or 0.0) > tolerances[r.layout.bf16]]
    print(f"{len(results) - len(bad)}/{len(results)} ok in {time.monotonic() - start:.0f} s")
    if a.workdir is None and not bad:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
