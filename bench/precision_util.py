"""What every speed script shares for ``--precision``: the flag, and the fp32 and bf16 matmul
rates of the same run (the yardsticks a useful FLOP rate is a fraction of)."""

from __future__ import annotations

import argparse
import time

import torch

from showattend import precision as P

CHOICES = ("fp32", "bf16", "auto", "compare")


def add_precision_arg(ap: argparse.ArgumentParser, default: str = "compare") -> None:
    ap.add_argument("--precision", choices=CHOICES, default=default,
                    help="fp32 | bf16 | auto (bf16 where the device has fast bf16) | compare "
                         "(fp32 and bf16 in the same run, and their ratio)")


def precisions(arg: str, dev: torch.device) -> list[str]:
    """The concrete precisions to measure for ``--precision arg``."""
    if arg == "compare":
        return ["fp32", "bf16"]
    return [P.resolve(arg, dev, "the benchmark")]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(dev: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    """GFLOP/s of an n×n matmul in ``dtype`` (best of three timings of ``reps`` products)."""
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * reps / best / 1e9


class Yardsticks:
    """fp32 and bf16 2048² matmul rates, measured between a script's phases and averaged."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.rates: dict[str, list[float]] = {"fp32": [], "bf16": []}

    def measure(self) -> None:
        self.rates["fp32"].append(matmul_rate(self.dev, torch.float32))
        self.rates["bf16"].append(matmul_rate(self.dev, torch.bfloat16))

    def mean(self, prec: str) -> float:
        r = self.rates[prec]
        return sum(r) / len(r) if r else float("nan")

    def line(self) -> str:
        f, b = self.mean("fp32"), self.mean("bf16")
        fast, why = P.fast_bf16(self.dev.type)
        return (f"matmul 2048² yardsticks: fp32 {f:.0f} GFLOP/s, bf16 {b:.0f} GFLOP/s "
                f"(bf16/fp32 {b / f:.2f}×; {len(self.rates['fp32'])} measurements each; "
                f"{why})")

    def fractions(self, gflops: float) -> str:
        return (f"{gflops / self.mean('fp32'):.0%} of the fp32 matmul rate, "
                f"{gflops / self.mean('bf16'):.0%} of the bf16 rate")
