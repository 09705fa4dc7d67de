"""OpenVINORuntime: prepares a pipeline (every heavy part to IR, adapters in its place), runs parts
through compiled models per input shape, and warms the shapes a job will run."""
from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import RuntimeUnavailable
from engine.options import owned_elsewhere
from engine.runtimes.base import Runtime, WarmupResult, WarmupShape
from engine.runtimes.deepcache import Schedule
from engine.runtimes.openvino.adapters import make_adapter
from engine.runtimes.openvino.compiled import CompiledModels
from engine.runtimes.openvino.convert import CONVERSION_VERSION, UNET_PARTS, job_shapes, parts_of
from engine.runtimes.openvino.ir_cache import IRCache
from engine.runtimes.openvino.loader import IRLoader
from engine.runtimes.openvino.probe import int8_convolution_probe
from engine.runtimes.openvino.quantize import has_quantized_convolutions
from engine.store.caches import DEFAULT_CACHE_DIR
from engine.system import devices
from engine.system.hardware import HardwareReport

# Two or four infer requests in flight against one after another, SD 1.5 at 512x512 (benchmarks/cores.py):
# 1.07x / 1.13x on a 16-core Xeon (bf16), 1.12x / 1.17x on a 2-core EPYC (fp32); each holds its own activations.
PARALLEL_GAIN = "1.17x"
LOW_MEMORY_BYTES = 8 << 30  # below this free RAM, "auto" keeps int8 convolutions even where they are slower
log = logging.getLogger(__name__)


def threads_line(compiled, logical_cores: int) -> str:
    """How many cores one inference uses, as the compiled model reports it."""
    try:
        threads, streams = (compiled.get_property(p) for p in ("INFERENCE_NUM_THREADS", "NUM_STREAMS"))
    except RuntimeError:
        return "OpenVINO did not report its threads"
    return (f"One image at a time on {threads} threads of {logical_cores} logical cores, {streams} stream "
            f"(LATENCY hint: OpenVINO uses one thread per physical core); a batch count runs its images one after "
            f"another: parallel infer requests measured at most {PARALLEL_GAIN} the images per minute, each with "
            f"activations of its own (benchmarks/cores.py)")


class OpenVINORuntime(Runtime):
    name = "openvino"

    @classmethod
    def available(cls, hardware: HardwareReport) -> str | None:
        error = hardware.openvino_error
        if hardware.openvino_version is None:
            if error:
                return f"openvino is installed but does not import: {error}"
            return "openvino is not installed (pip install openvino)"
        if "CPU" not in hardware.openvino_devices:
            return "OpenVINO finds no CPU device" + (f" ({error})" if error else "")
        return None

    @classmethod
    def option_reasons(cls, hardware: HardwareReport) -> dict[str, str]:
        why = "needs the PyTorch runtime (OpenVINO runs the UNet as one compiled graph)"
        reasons = {name: why for name in owned_elsewhere("openvino")}
        # tomesd does convert into the graph, but its merge sizes are fixed per image size, and it buys little there.
        reasons["token_merging_ratio"] = ("needs the PyTorch runtime: converted into OpenVINO's SD 1.5 UNet, ratio 0.5 "
                                          "measured 1.00x (2-core EPYC) to 1.13x (16-core Xeon) at 512x512, and each "
                                          "image size would need its own conversion (benchmarks/tome_openvino.py)")
        return reasons

    def __init__(self, hardware, optimizations, cache_dir: Path | None = None, max_shapes: int = 4):
        super().__init__(hardware, optimizations, cache_dir)
        import openvino as ov

        wish = optimizations.precision
        if wish == "fp16":
            raise RuntimeUnavailable("fp16 is not offered on the OpenVINO CPU device; use bf16 or fp32.")
        self.core = ov.Core()
        self.ir_cache = IRCache(self.cache_root)
        self.blob_dir = self.cache_root / "compiled"
        # bf16 where the CPU has it in hardware; elsewhere OpenVINO would run f32 anyway.
        self._hint = "bf16" if wish == "bf16" or (wish == "auto" and hardware.cpu.has_fast_bf16) else "f32"
        self._precision = "bf16" if self._hint == "bf16" and hardware.cpu.has_fast_bf16 else "fp32"
        self.decisions.append(
            f"Precision {self._precision} ({'auto' if wish == 'auto' else 'asked'}, hint {self._hint}): "
            + ("this CPU has hardware bf16" if hardware.cpu.has_fast_bf16 else
               "no hardware bf16 on this CPU, so OpenVINO runs f32 whatever the hint"))
        self._hybrid = self._int8_convolutions(optimizations.int8_convolutions)
        self._int8 = optimizations.int8_weights or self._hybrid
        kind = "int8h" if self._hybrid else ("int8" if self._int8 else "f32")
        variant = f"ov{ov.get_version().split('-')[0]}-c{CONVERSION_VERSION}-{kind}"
        self.parts = parts_of(optimizations.deepcache)
        self.loader = IRLoader(self.core, self.ir_cache, variant, int8=self._int8, hybrid=self._hybrid,
                               parts=self.parts)
        self.deepcache = (Schedule(optimizations.deepcache_interval, optimizations.deepcache_start)
                          if optimizations.deepcache else None)
        self.conversions = self.loader.conversions  # an attribute: benchmarks read it from __dict__
        self._models = CompiledModels(self.core, self._config, self.ir_cache.files_root, self.compile_events,
                                      max_shapes)
        # The prepared pipeline's state, replaced as a whole by prepare():
        self._identity: str | None = None
        self._irs: dict[str, Any] = {}  # part -> ov.Model
        self._convs_quantized = False  # whether the UNet's IR really has quantized convolutions
        self._last_part: str | None = None  # the part inferred last; its scratch is freed when another runs
        self._threads_noted = False
        self._threads: int | None = None  # a limit (limit_threads); None: OpenVINO's own choice

    def _int8_convolutions(self, wish: str) -> bool:
        """Whether the UNet's convolutions are quantized: as asked ("on"/"off"), or for "auto" where the probe
        finds them faster on this CPU, or where memory is short (they keep the compiled UNet ~3x smaller)."""
        if wish != "auto":
            return wish == "on"
        try:
            probe = int8_convolution_probe(self.core, self.hardware.cpu, self._hint, self.cache_root)
        except Exception as e:  # nncf or the plugin could not run it: say so, keep the precision we know
            log.warning("int8 convolution probe failed", exc_info=True)
            self.decisions.append(f"INT8 convolutions (auto) off: the probe could not run ({type(e).__name__}: {e})")
            return False
        free = devices.free_bytes("cpu")
        if probe.faster:
            self.decisions.append(f"INT8 convolutions (auto) on: {probe.describe()}")
            return True
        if free < LOW_MEMORY_BYTES:
            self.decisions.append(f"INT8 convolutions (auto) on for memory: {free / devices.GIB:.1f} GiB free, though "
                                  f"{probe.describe()}")
            return True
        self.decisions.append(f"INT8 convolutions (auto) off: {probe.describe()}, and memory is not short "
                              f"({free / devices.GIB:.1f} GiB free); int8 weights stay as asked")
        return False

    # -- what it is

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else DEFAULT_CACHE_DIR

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def compiles(self) -> bool:
        return True

    @property
    def precision(self) -> str:
        base = self._models.precision.get("unet", self._precision)
        if self._hybrid and self._convs_quantized:
            return base + " + int8 weights + int8 convolutions"
        return base + (" + int8 weights" if self._int8 else "")

    @property
    def variant(self) -> str:
        return self.loader.variant

    @property
    def max_shapes(self) -> int:
        return self._models.max_shapes

    @max_shapes.setter
    def max_shapes(self, value: int) -> None:
        self._models.max_shapes = value

    @property
    def _compiled(self):
        return self._models.entries

    @property
    def _cost(self) -> dict[str, int]:
        return self._models.cost

    fuses_in_place = False  # the weights are in the IR: a LoRA change converts (or loads) the fused parts

    def cached_components(self, identity_of) -> set[str]:
        return self.loader.cached_components(identity_of)

    def describe(self) -> str:
        return f"openvino on CPU ({self.precision}), IR cache {self.cache_root}"

    # -- preparing a pipeline

    def prepare(self, model) -> None:
        """Converts every part before it touches the runtime's state: a load that fails leaves the model
        prepared before working. Only the new pipe's components are replaced as their parts convert, so
        each PyTorch copy goes as soon as OpenVINO holds its weights."""
        pipe, identity = model.pipe, model.identity
        calibration = self.loader.calibration(pipe, model.component_identity)
        irs = {}
        for component, parts in self.parts.items():
            module = getattr(pipe, component, None)
            if module is None:
                continue
            for part in parts:
                irs[part] = self.loader.ir(model.component_identity(component), part, module, calibration)
            setattr(pipe, component, make_adapter(self, component, module.config))
            del module
        del calibration  # used only while converting the UNet
        gc.collect()
        self._models.clear()
        self._identity, self._irs, self._last_part = identity, irs, None
        unet_part = next((p for p in UNET_PARTS if p in irs), None)
        self._convs_quantized = unet_part is not None and has_quantized_convolutions(irs[unet_part])
        if self.deepcache is not None:
            start = self.optimizations.deepcache_start
            self.applied = [f"DeepCache every {self.deepcache.interval}" + (f" after {start:.0%} of the steps" if start else "")
                            + " (full and shallow UNet graphs)"]

    # -- running

    def limit_threads(self, threads: int) -> None:
        self._threads = threads
        super().limit_threads(threads)  # torch still runs the scheduler and the odd eager op

    def _config(self) -> dict:
        config = {"INFERENCE_PRECISION_HINT": self._hint, "PERFORMANCE_HINT": "LATENCY"}
        if self._threads:
            config["INFERENCE_NUM_THREADS"] = self._threads
        if not self.optimizations.compiled_blob_cache:
            return config
        try:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            if os.access(self.blob_dir, os.W_OK):
                config["CACHE_DIR"] = str(self.blob_dir)
        except OSError:
            pass  # no compiled-blob cache; compile every start
        return config

    def compiled(self, part: str, shapes: dict[str, tuple[int, ...]]):
        compiled = self._models.get(part, self._irs[part], shapes)
        if not self._threads_noted:
            self._threads_noted = True
            self.decisions.append(threads_line(compiled, self.hardware.cpu.logical_cores))
        return compiled

    def infer(self, part: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        group = "unet" if part in UNET_PARTS else part  # DeepCache alternates its two graphs: keep both's scratch
        if group != self._last_part:  # before compiling this part, so a compile never meets the other's scratch
            for name in (UNET_PARTS if self._last_part == "unet" else (self._last_part,)):
                self._models.release_scratch(name)
            self._last_part = group
        compiled = self.compiled(part, {k: v.shape for k, v in inputs.items()})
        result = compiled(inputs)
        # Copy: the request's output buffers are reused by the next call.
        return [np.array(result[out]) for out in compiled.outputs]

    def unet(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One UNet call: the plain graph, or DeepCache's full graph (keeping its deep features) or shallow one."""
        batch = inputs["sample"].shape[0]
        if self.deepcache is None:
            self.count_unet_call(batch)
            return self.infer("unet", inputs)[0]
        if self.deepcache.next_is_full(float(inputs["timestep"][0]), inputs["sample"].shape):
            out, deep = self.infer("unet_deep", inputs)
            self.deepcache.keep(deep, batch)
            return out
        return self.infer("unet_shallow", {**inputs, "deep": self.deepcache.kept})[0]

    def warmup(self, model, shapes: list[WarmupShape]) -> list[WarmupResult]:
        """Compile every graph at the shapes a job of each `shape` feeds it (see job_shapes)."""
        results = []
        for shape in shapes:
            mark, start = self.compile_mark(), time.perf_counter()
            for part, inputs in job_shapes(model, shape, self._irs):
                self.compiled(part, inputs)
            compiled = len(self.compile_events) > mark
            results.append(WarmupResult(shape.width, shape.height, shape.batch, time.perf_counter() - start,
                                        compiled=compiled, state="compiled" if compiled else "already warm"))
        return results
