"""PyTorch runtime: eager diffusers on CUDA (fp16, SDPA/xformers), MPS, or CPU (bf16 autocast where the CPU
has it), plus the PyTorch-side optimizations: channels_last, attention slicing, token merging, DeepCache and
torch.compile."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil

import torch

from engine.errors import RuntimeUnavailable
from engine.options import owned_elsewhere
from engine.runtimes.base import Runtime, ShapeLog
from engine.system.hardware import HardwareReport


def _imports(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would use, if there is one."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")):
        if shutil.which(name):
            return name
    return None


class PyTorchRuntime(Runtime):
    name = "pytorch"

    @classmethod
    def available(cls, hardware: HardwareReport) -> str | None:
        return None  # runs anywhere torch imports

    @classmethod
    def option_reasons(cls, hardware: HardwareReport) -> dict[str, str]:
        reasons = owned_elsewhere("pytorch")
        if not hardware.has_cuda:
            reasons["attention"] = "xformers needs CUDA; SDPA is used"
        elif not _imports("xformers"):
            reasons["attention"] = "xformers does not import (pip install -r requirements-cuda.txt); SDPA is used"
        if not _imports("tomesd"):
            reasons["token_merging_ratio"] = "needs tomesd (pip install tomesd)"
        if not hardware.has_cuda and not hardware.mps_available and cpp_compiler() is None:
            reasons["torch_compile"] = "needs a C++ compiler (g++) for the CPU backend"
        return reasons

    def __init__(self, hardware, optimizations, cache_dir=None):
        super().__init__(hardware, optimizations, cache_dir)
        if optimizations.int8_weights or optimizations.int8_convolutions != "off":
            raise RuntimeUnavailable("INT8 weights need the OpenVINO runtime.")
        if hardware.has_cuda:
            self._device = "cuda"
        elif hardware.mps_available:
            self._device = "mps"
        else:
            self._device = "cpu"
        self._precision = self._choose_precision(optimizations.precision)

    def _choose_precision(self, wish: str) -> str:
        if wish == "fp16" and self._device == "cpu":
            raise RuntimeUnavailable("fp16 needs a GPU; on CPU use bf16 or fp32.")
        if self._device != "cpu":
            chosen = "fp16" if wish == "auto" else wish
            self.decisions.append(f"Precision {chosen} ({'auto' if wish == 'auto' else 'asked'}) on {self._device}")
            return chosen
        fast = self.hardware.cpu.has_fast_bf16
        chosen = ("bf16" if fast else "fp32") if wish == "auto" else wish
        if chosen == "bf16":
            why = ("this CPU has hardware bf16, so matmuls and convolutions run in bf16 through autocast (weights "
                   "stay fp32)" if fast else "emulated on this CPU (no AVX512-BF16 or AMX): expect it slower than fp32")
        else:
            why = ("this CPU has hardware bf16, which bf16 (auto) would use" if fast else
                   "this CPU has no hardware bf16: emulated bf16 is slower than fp32")
        self.decisions.append(f"Precision {chosen} ({'auto' if wish == 'auto' else 'asked'}): {why}")
        return chosen

    @property
    def device(self) -> str:
        return self._device

    @property
    def compiles(self) -> bool:
        return self.optimizations.torch_compile

    @property
    def fallible(self) -> str | None:
        return "torch.compile" if self.compiles else None  # eager PyTorch is the fallback itself

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
        opts = self.optimizations
        pipe.to(self._device)
        if self.weight_dtype != torch.float32:
            pipe.to(dtype=self.weight_dtype)
        if self.weight_dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
        applied, deepcache = [], None  # runtime state changes only once this model is ready
        if opts.attention == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
            applied.append("xformers attention")
        else:
            # diffusers uses torch SDPA (AttnProcessor2_0) by default; make it explicit.
            from diffusers.models.attention_processor import AttnProcessor2_0

            pipe.unet.set_attn_processor(AttnProcessor2_0())
        if opts.attention_slicing:
            pipe.enable_attention_slicing()  # attention in slices: less peak memory, a little slower
            applied.append("attention slicing")
        if opts.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            applied.append("channels_last")
        if opts.token_merging_ratio > 0:
            import tomesd

            tomesd.apply_patch(pipe, ratio=opts.token_merging_ratio)
            applied.append(f"token merging {opts.token_merging_ratio:g}")
        if opts.deepcache:
            from engine.runtimes.deepcache import DeepCache

            deepcache = DeepCache(pipe.unet, opts.deepcache_interval, opts.deepcache_start).install()
            applied.append(f"DeepCache every {opts.deepcache_interval}"
                           + (f" after {opts.deepcache_start:.0%} of the steps" if opts.deepcache_start else ""))
        else:
            pipe.unet.register_forward_pre_hook(self._count_call, with_kwargs=True)
        if opts.torch_compile:
            # CUDA graphs on CUDA, except with DeepCache, whose kept features outlive a graph replay.
            mode = "reduce-overhead" if self._device == "cuda" and not opts.deepcache else None
            pipe.unet = torch.compile(pipe.unet, mode=mode)
            ShapeLog(pipe.unet, "unet", self.compile_events)  # compiled at each shape's first call
            applied.append("torch.compile" + (" (reduce-overhead)" if mode else ""))
        self.applied, self.deepcache = applied, deepcache

    def _count_call(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample")
        self.count_unet_call(sample.shape[0])

    def inference_context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self._device == "cpu" and self._precision == "bf16":
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        return stack
