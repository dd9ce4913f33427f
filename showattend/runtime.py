"""Runtime choices of a run, in one place: device, precision, threads, denormals, determinism.

Training, evaluation, ``prepare``, the API and ``serve`` all pick their device and precision
here, so "auto" and "bf16" mean the same thing everywhere. Callers look the helpers up through
this module (``runtime.autocast(...)``) so that one substitution reaches every path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from showattend import precision

__all__ = ["TrainingError", "resolve_device", "autocast", "process_settings"]


class TrainingError(RuntimeError):
    """A run cannot continue (non-finite loss, bad resume, missing GPU…)."""


def resolve_device(name: str) -> torch.device:
    """"auto" → first GPU if present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device '{name}' was requested but no CUDA GPU is available "
                            f"(use the cpu device instead)")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device '{name}'") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TrainingError(f"device '{name}' was requested but only "
                            f"{torch.cuda.device_count()} CUDA GPU(s) are visible")
    if dev.type not in ("cpu", "cuda"):
        # mps/xpu/...: torch.device() accepts the name even when this build or machine cannot
        # use it, and the first tensor moved there fails with a traceback deep in the model.
        try:
            torch.empty(0, device=dev)
        except Exception:  # noqa: BLE001 - RuntimeError/AssertionError depending on the backend
            raise TrainingError(f"device '{name}' was requested but is not available here "
                                f"(use the cpu device instead)") from None
    return dev


def autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The block a forward pass (and its loss) or a decoding call runs in at precision ``name``
    (resolved: "fp32" | "bf16"; "auto" is taken as fp32 here — resolve it first): CUDA autocast,
    or on the CPU the bf16 products of :mod:`showattend.precision`. Wraps forward passes and
    losses only: backward reuses the dtypes chosen there, and bf16 keeps fp32's exponent range,
    so no gradient scaler is needed."""
    return precision.compute(name, device)


@contextlib.contextmanager
def process_settings() -> Iterator[None]:
    """Restore the process-wide torch settings a run changes (threads, deterministic algorithms,
    flushing denormals) on exit, so a run started from a notebook, an API user's program or a
    test session leaves the caller's numerics as they were."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    flush_denormal = float(torch.tensor([1e-40]) * 1.0) == 0.0  # torch has no getter for this
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_flush_denormal(flush_denormal)


def apply_run_settings(device: torch.device, threads: int, deterministic: bool, seed: int) -> None:
    """The settings of a training run (undone by :func:`process_settings`)."""
    if device.type == "cpu":
        # Denormal floats appear in LSTM/attention gradients late in training and slow CPU
        # arithmetic by an order of magnitude; flushing them to zero costs no accuracy here.
        torch.set_flush_denormal(True)
    if threads > 0:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
