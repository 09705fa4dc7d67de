"""PyTorch runtime: eager diffusers on CUDA (fp16, SDPA), MPS, or CPU (bf16 autocast where the CPU has it)."""
from __future__ import annotations

import contextlib

import torch

from ..errors import RuntimeUnavailable
from ..hardware import HardwareReport
from .base import Runtime


class PyTorchRuntime(Runtime):
    name = "pytorch"

    @classmethod
    def available(cls, hardware: HardwareReport) -> str | None:
        return None  # runs anywhere torch imports

    def __init__(self, hardware, optimizations, cache_dir=None):
        super().__init__(hardware, optimizations, cache_dir)
        if optimizations.int8_weights:
            raise RuntimeUnavailable("INT8 weights need the OpenVINO runtime.")
        if hardware.has_cuda:
            self._device = "cuda"
        elif hardware.mps_available:
            self._device = "mps"
        else:
            self._device = "cpu"
        self._precision = self._choose_precision(optimizations.precision)

    def _choose_precision(self, wish: str) -> str:
        if wish == "auto":
            if self._device in ("cuda", "mps"):
                return "fp16"
            return "bf16" if self.hardware.cpu.has_fast_bf16 else "fp32"
        if wish == "fp16" and self._device == "cpu":
            raise RuntimeUnavailable("fp16 needs a GPU; on CPU use bf16 or fp32.")
        return wish

    @property
    def device(self) -> str:
        return self._device

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def weight_dtype(self) -> torch.dtype:
        # On CPU weights stay fp32 and bf16 comes from autocast: a bf16 copy of the weights
        # would round them once more and gains little where matmuls already run in bf16.
        if self._device != "cpu" and self._precision == "fp16":
            return torch.float16
        if self._device != "cpu" and self._precision == "bf16":
            return torch.bfloat16
        return torch.float32

    def prepare(self, model) -> None:
        pipe = model.pipe
        pipe.to(self._device)
        if self.weight_dtype != torch.float32:
            pipe.to(dtype=self.weight_dtype)
        if self.weight_dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
        # diffusers uses torch SDPA (AttnProcessor2_0) by default; make it explicit.
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())

    def inference_context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self._device == "cpu" and self._precision == "bf16":
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        return stack
