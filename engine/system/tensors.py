"""Where a tensor leaves the model: float32 on the CPU, and the math done on it there without autocast.

A runtime may run the model in bf16 (CPU autocast, or bf16/fp16 weights on a GPU). Under autocast even an
einsum on float32 inputs gives bf16, and numpy, PIL and several float32-only ops refuse bf16 and fp16.
So whatever reads model outputs outside the model (previews, decodes, blends, comparisons) converts them
once with `host_float`, inside `full_precision()`.
"""
from __future__ import annotations

import contextlib

import torch


def host_float(tensor: torch.Tensor) -> torch.Tensor:
    """A detached float32 CPU copy (no copy where it already is one)."""
    return tensor.detach().to(device="cpu", dtype=torch.float32)


def to_numpy(tensor: torch.Tensor):
    """float32 numpy array of any tensor, whatever its dtype or device."""
    return host_float(tensor).numpy()


@contextlib.contextmanager
def full_precision():
    """Autocast off (CPU and CUDA) for the block: its ops run in the dtypes of their inputs."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield
