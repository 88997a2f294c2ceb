"""What a training run reports: the log line, the --metrics-file JSON lines, TensorBoard scalars.

One rank writes (the last pipeline stage's TP-rank 0 of DP-rank 0: it holds the loss); the others
build a `Reporter` with `enabled=False`, which does nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

# Dense bf16/fp16 peak TFLOP/s per device (tensor cores, no sparsity), matched on the CUDA device
# name. Override with --peak-tflops; on CPU there is no entry and MFU prints "n/a".
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def device_peak_tflops(override: Optional[float] = None) -> Optional[float]:
    """Peak TFLOP/s of this rank's device: the override, the table entry, or None."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if key in name:
            return PEAK_TFLOPS[key]
    return None


# MoE metric keys shown on the log line (all MoE keys go to the metrics file and TensorBoard).
MOE_SUMMARY = (
    ("moe_load_balancing_loss", "load balancing loss"),
    ("moe_z_loss", "z-loss"),
    ("moe_load_max_over_mean", "expert load max/mean"),
)


class Reporter:
    """Writes each logged iteration to stdout, the metrics file and TensorBoard."""

    def __init__(
        self,
        enabled: bool,
        metrics_file: Optional[str] = None,
        tensorboard_dir: Optional[str] = None,
        train_iters: int = 0,
    ):
        self.enabled = enabled
        self.train_iters = train_iters
        self._metrics = None
        self._tb = None
        if not enabled:
            return
        if metrics_file:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self._metrics = open(metrics_file, "a", buffering=1)  # noqa: SIM115 (lives with run)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tensorboard_dir, exist_ok=True)
            self._tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=50)

    def train(self, record: dict) -> None:
        """One logged training iteration: keys as in DESIGN.md's metrics file contract."""
        if not self.enabled:
            return
        it = record["iteration"]

        def fmt(key, spec, unit=""):
            value = record.get(key)
            if value is None:
                return "n/a"
            return f"{value:{spec}}{unit}"

        parts = [
            f"iteration {it:>6}/{self.train_iters}",
            f"consumed samples {record['consumed_samples']}",
            f"lm loss {record['lm_loss']:.6f}",
            f"lr {record['lr']:.4e}",
            f"grad norm {fmt('grad_norm', '.4f')}",
        ]
        if "loss_scale" in record:
            parts.append(f"loss scale {record['loss_scale']:.1f}")
        if "num_zeros_in_grad" in record:  # --log-num-zeros-in-grad
            parts.append(f"num zeros {fmt('num_zeros_in_grad', 'd')}")
        parts += [
            f"skipped {record.get('skipped_iterations', 0)}",
            f"step {record['step_time_s'] * 1000:.1f} ms",
            f"tokens/s {record['tokens_per_sec']:.0f}",
            f"TFLOP/s/device {fmt('tflops_per_device', '.3g')}",
            f"MFU {fmt('mfu', '.1%')}",
        ]
        for key, label in MOE_SUMMARY:  # MoE runs: means over the MoE layers
            if key in record:
                parts.append(f"{label} {record[key]:.4g}")
        print(" | ".join(parts), flush=True)
        self._write(record)
        if self._tb is not None:
            for key in (
                "lm_loss",
                "lr",
                "grad_norm",
                "num_zeros_in_grad",
                "tokens_per_sec",
                "loss_scale",
                "tflops_per_device",
                "mfu",
                "step_time_s",
                *(k for k in record if k.startswith("moe_")),  # MoE: per layer and summary
            ):
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, it)

    def valid(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 20.0))
        print(
            f"validation at iteration {iteration} | lm loss {loss:.6f} | lm ppl {ppl:.3f}",
            flush=True,
        )
        self._write({"iteration": iteration, "split": "valid", "lm_loss": loss, "lm_ppl": ppl})
        if self._tb is not None:
            self._tb.add_scalar("valid/lm_loss", loss, iteration)
            self._tb.add_scalar("valid/lm_ppl", ppl, iteration)

    def _write(self, record: dict) -> None:
        if self._metrics is not None:
            clean = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in record.items()
            }
            self._metrics.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
