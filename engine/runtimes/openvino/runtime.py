"""OpenVINO runtime: each heavy component converted to OpenVINO IR, compiled per static shape.

- Conversion uses openvino's own `convert_model` on the diffusers modules (no optimum-intel).
- The IR is cached on disk keyed by model identity, OpenVINO version and options; a second
  start reads it and never builds the PyTorch weights of cached components.
- Compiled models are kept in an LRU keyed by input shape, so warmed resolutions cost no
  compile; OpenVINO's CACHE_DIR keeps compiled blobs across starts.
- Adapters with the call signatures diffusers uses stand in for the PyTorch modules, so the
  same diffusers pipelines run on them.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ...errors import RuntimeUnavailable
from ...hardware import HardwareReport
from ...options import owned_elsewhere
from ..base import CompileEvent, Runtime, WarmupResult, WarmupShape

log = logging.getLogger(__name__)

CONVERSION_VERSION = 1  # bump when what convert_* produce changes
DEFAULT_CACHE_DIR = Path(os.environ.get("FASTSD_CACHE_DIR", Path.home() / ".cache" / "fast-sd"))
TEXT_LENGTH = 77
RESERVE_BYTES = 1 << 30  # memory left free for activations and the rest of the process
PARTS_OF = {  # pipeline component -> IR parts made from it
    "unet": ("unet",),
    "vae": ("vae_decoder", "vae_encoder"),
    "text_encoder": ("text_encoder",),
    "text_encoder_2": ("text_encoder_2",),
}


# ---------------------------------------------------------------- conversion


class _UNetWrap(torch.nn.Module):
    def __init__(self, unet, sdxl: bool, has_cond: bool):
        super().__init__()
        self.unet, self.sdxl, self.has_cond = unet, sdxl, has_cond

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         added_cond_kwargs=added, return_dict=False)[0]


class _DecoderWrap(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class _EncoderWrap(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae._encode(image)  # moments: mean and log-variance


class _TextWrap(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


def _unet_inputs(config, batch: int, latent_h: int, latent_w: int) -> dict[str, tuple[list[int], torch.dtype]]:
    inputs = {
        "sample": ([batch, config.in_channels, latent_h, latent_w], torch.float32),
        "timestep": ([1], torch.float32),
        "encoder_hidden_states": ([batch, TEXT_LENGTH, config.cross_attention_dim], torch.float32),
    }
    if config.addition_embed_type == "text_time":
        time_dim = config.addition_time_embed_dim
        inputs["text_embeds"] = ([batch, config.projection_class_embeddings_input_dim - 6 * time_dim], torch.float32)
        inputs["time_ids"] = ([batch, 6], torch.float32)
    if config.time_cond_proj_dim:
        inputs["timestep_cond"] = ([batch, config.time_cond_proj_dim], torch.float32)
    return inputs


def precision_name(hint) -> str:
    """Our name for a compiled model's INFERENCE_PRECISION_HINT. It is an ov.Type, whose str() is
    "<Type: 'bfloat16'>"; to_string() gives the short name ("bf16", "f16", "f32")."""
    short = hint.to_string() if hasattr(hint, "to_string") else str(hint).lower()
    return {"bf16": "bf16", "f16": "fp16"}.get(short, "fp32")


def _convert(module: torch.nn.Module, example: dict[str, torch.Tensor]):
    import openvino as ov

    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing notes every Python-level shape check; the ones in diffusers are for fixed
        # channel counts and batch < 64, which hold for every shape we reshape to.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return ov.convert_model(module, example_input=example)


def convert_part(part: str, component) -> Any:
    """PyTorch component -> dynamic-shape ov.Model for one IR part."""
    if part == "unet":
        cfg = component.config
        # An odd latent size makes the trace keep diffusers' explicit upsample sizes, so the
        # graph is right for latent sizes that are not a multiple of the UNet's down factor.
        shapes = _unet_inputs(cfg, 2, 9, 9)
        example = {k: torch.randn(s, dtype=d) for k, (s, d) in shapes.items()}
        example["timestep"] = torch.tensor([999.0])
        wrap = _UNetWrap(component, cfg.addition_embed_type == "text_time", bool(cfg.time_cond_proj_dim))
        return _convert(wrap, example)
    if part == "vae_decoder":
        return _convert(_DecoderWrap(component), {"latent": torch.randn(1, component.config.latent_channels, 9, 9)})
    if part == "vae_encoder":
        return _convert(_EncoderWrap(component), {"image": torch.randn(1, 3, 72, 72)})
    if part in ("text_encoder", "text_encoder_2"):
        return _convert(_TextWrap(component), {"input_ids": torch.ones(1, TEXT_LENGTH, dtype=torch.int64)})
    raise ValueError(part)


# ---------------------------------------------------------------- disk cache


class IRCache:
    """Converted IR on disk: root/identity/variant/part.{xml,bin} + part.json manifest.

    The manifest records sizes and a sampled hash of the .bin; an entry that does not match
    (truncated, overwritten, half-written) is deleted and rebuilt, never fatal.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def files_root(self) -> Path:
        """Where every entry's files live."""
        return self.root / "ir"

    def folder(self, identity: str, variant: str) -> Path:
        return self.files_root / identity / variant

    @staticmethod
    def _fingerprint(path: Path) -> str:
        size = path.stat().st_size
        h = hashlib.sha256(str(size).encode())
        with open(path, "rb") as f:
            for i in range(16):  # 16 samples of 64 KiB spread over the file: cheap on GBs
                f.seek(size * i // 16)
                h.update(f.read(1 << 16))
        return h.hexdigest()

    def valid(self, identity: str, variant: str, part: str) -> bool:
        folder = self.folder(identity, variant)
        xml, binf, manifest = folder / f"{part}.xml", folder / f"{part}.bin", folder / f"{part}.json"
        try:
            meta = json.loads(manifest.read_text())
            return (meta["xml_sha256"] == hashlib.sha256(xml.read_bytes()).hexdigest()
                    and meta["bin_fingerprint"] == self._fingerprint(binf))
        except (OSError, ValueError, KeyError):
            return False

    def load(self, core, identity: str, variant: str, part: str):
        folder = self.folder(identity, variant)
        if not self.valid(identity, variant, part):
            self.discard(identity, variant, part)
            return None
        try:
            return core.read_model(str(folder / f"{part}.xml"))
        except Exception as e:  # parse failure despite a matching manifest: rebuild
            log.warning("OpenVINO IR cache entry %s/%s unreadable (%s); rebuilding", folder, part, e)
            self.discard(identity, variant, part)
            return None

    def discard(self, identity: str, variant: str, part: str) -> None:
        folder = self.folder(identity, variant)
        for suffix in (".xml", ".bin", ".json"):
            try:
                (folder / f"{part}{suffix}").unlink(missing_ok=True)
            except OSError:  # unreadable or unwritable cache: nothing to discard
                pass

    def save(self, model, identity: str, variant: str, part: str) -> bool:
        """Write atomically (temp folder, then rename); False where the cache is not writable."""
        import openvino as ov

        folder = self.folder(identity, variant)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=folder))
        except OSError as e:
            log.warning("OpenVINO IR cache %s not writable (%s); converting again next start", folder, e)
            return False
        try:
            ov.save_model(model, str(tmp / f"{part}.xml"), compress_to_fp16=False)
            meta = {"xml_sha256": hashlib.sha256((tmp / f"{part}.xml").read_bytes()).hexdigest(),
                    "bin_fingerprint": self._fingerprint(tmp / f"{part}.bin")}
            (tmp / f"{part}.json").write_text(json.dumps(meta))
            for suffix in (".bin", ".xml", ".json"):  # manifest last: it marks the entry complete
                os.replace(tmp / f"{part}{suffix}", folder / f"{part}{suffix}")
            return True
        except OSError as e:
            log.warning("could not write OpenVINO IR cache %s (%s)", folder, e)
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- adapters


class _Adapter:
    """What diffusers reads off a component besides calling it."""

    def __init__(self, runtime: "OpenVINORuntime", part: str, config):
        self._runtime, self._part, self.config = runtime, part, config
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def to(self, *args, **kwargs):  # weights live in OpenVINO; moving is a no-op
        return self

    def modules(self):  # diffusers walks modules looking for offload hooks; there are none
        return iter((self,))

    def eval(self):
        return self


def _np(x: torch.Tensor, dtype=np.float32) -> np.ndarray:
    x = x.detach().to("cpu")
    return (x.float() if dtype == np.float32 else x).numpy().astype(dtype, copy=False)


class OVUNet(_Adapter):
    def __init__(self, runtime, config):
        super().__init__(runtime, "unet", config)
        if config.addition_embed_type == "text_time":
            # SDXL's pipeline reads the add-embedding width off the module.
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(
                in_features=config.projection_class_embeddings_input_dim))

    def __call__(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                 added_cond_kwargs=None, return_dict=True, **_):
        t = timestep.reshape(-1)[:1] if torch.is_tensor(timestep) else torch.tensor([float(timestep)])
        inputs = {"sample": _np(sample), "timestep": _np(t), "encoder_hidden_states": _np(encoder_hidden_states)}
        if added_cond_kwargs:
            inputs["text_embeds"] = _np(added_cond_kwargs["text_embeds"])
            inputs["time_ids"] = _np(added_cond_kwargs["time_ids"])
        if self.config.time_cond_proj_dim:
            if timestep_cond is None:
                raise RuntimeUnavailable("This model needs a guidance embedding (timestep_cond) input.")
            inputs["timestep_cond"] = _np(timestep_cond)
        out = self._runtime.infer("unet", inputs)[0]
        out = torch.from_numpy(out)
        return SimpleNamespace(sample=out) if return_dict else (out,)


class OVVae(_Adapter):
    def __init__(self, runtime, config):
        super().__init__(runtime, "vae", config)

    def decode(self, z, return_dict=True, generator=None):
        image = torch.from_numpy(self._runtime.infer("vae_decoder", {"latent": _np(z)})[0])
        return SimpleNamespace(sample=image) if return_dict else (image,)

    def encode(self, x, return_dict=True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = torch.from_numpy(self._runtime.infer("vae_encoder", {"image": _np(x)})[0])
        dist = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)


class _TextOutput:
    def __init__(self, last, penultimate, pooled, with_projection: bool, layers: int):
        self.last_hidden_state = last
        self.hidden_states = tuple([None] * (layers - 1) + [penultimate, last])
        self.text_embeds = pooled if with_projection else None
        self.pooler_output = None if with_projection else pooled
        self._first = pooled if with_projection else last

    def __getitem__(self, i):
        if i == 0:
            return self._first
        if i == 1 and self.pooler_output is not None:
            return self.pooler_output
        raise IndexError(i)


class OVTextEncoder(_Adapter):
    def __init__(self, runtime, part, config, with_projection: bool):
        super().__init__(runtime, part, config)
        self.with_projection = with_projection

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=True, **_):
        last, penult, pooled = (torch.from_numpy(a) for a in self._runtime.infer(self._part, {
            "input_ids": _np(input_ids, np.int64)}))
        return _TextOutput(last, penult, pooled, self.with_projection, self.config.num_hidden_layers)


# ---------------------------------------------------------------- INT8 convolutions

CALIBRATION_PROMPTS = ["a photograph of a cat sitting on a red sofa", "a watercolour landscape with mountains",
                       "a portrait of an old man, oil painting", "a red circle on a blue background"]
CALIBRATION_TIMESTEPS = (999, 900, 750, 600, 450, 300, 150, 20)
CALIBRATION_LATENT = 32  # calibrate at 256x256: activation ranges carry over, at a quarter of the cost of 512


def hybrid_quantize(model, samples: list[dict[str, np.ndarray]]):
    """Weight-only int8 for MatMuls (OpenVINO keeps those int8 and unpacks per call), full int8
    quantization (weights and activations, ranges from `samples`) for Convolutions, the split
    optimum-intel uses for diffusion models."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    matmuls = []
    for op in model.get_ordered_ops():
        if op.get_type_name() == "MatMul":
            src = op.input_value(1).get_node()
            while src.get_type_name() == "Convert":
                src = src.input_value(0).get_node()
            if src.get_type_name() == "Constant":
                matmuls.append(op.get_friendly_name())
    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                  ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
    return nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples), model_type=nncf.ModelType.TRANSFORMER,
                         ignored_scope=nncf.IgnoredScope(names=matmuls, validate=False),
                         advanced_parameters=AdvancedQuantizationParameters(
                             smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1, convolution=-1)))


# ---------------------------------------------------------------- runtime


class OpenVINORuntime(Runtime):
    name = "openvino"

    @classmethod
    def available(cls, hardware: HardwareReport) -> str | None:
        if hardware.openvino_version is None:
            return "openvino is not installed (pip install openvino)"
        if "CPU" not in hardware.openvino_devices:
            return "OpenVINO finds no CPU device"
        return None

    @classmethod
    def option_reasons(cls, hardware: HardwareReport) -> dict[str, str]:
        why = "needs the PyTorch runtime (OpenVINO runs the UNet as one compiled graph)"
        return {name: why for name in owned_elsewhere("openvino")}

    def __init__(self, hardware, optimizations, cache_dir: Path | None = None, max_shapes: int = 4):
        super().__init__(hardware, optimizations, cache_dir)
        import openvino as ov

        wish = optimizations.precision
        if wish == "fp16":
            raise RuntimeUnavailable("fp16 is not offered on the OpenVINO CPU device; use bf16 or fp32.")
        self._ov = ov
        self.core = ov.Core()
        self.ir_cache = IRCache(self.cache_root)
        self.blob_dir = self.cache_root / "compiled"
        # bf16 where the CPU has it in hardware; elsewhere OpenVINO would run f32 anyway.
        self._hint = "bf16" if wish == "bf16" or (wish == "auto" and hardware.cpu.has_fast_bf16) else "f32"
        self._precision = "bf16" if self._hint == "bf16" and hardware.cpu.has_fast_bf16 else "fp32"
        self.max_shapes = max_shapes
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self._cost: dict[str, int] = {}  # part -> RSS one compile of it added
        self.compile_events: list[CompileEvent] = []
        self.conversions: list[tuple[str, float]] = []  # (part, seconds) converted in this process
        self._identity: str | None = None
        self._irs: dict[str, Any] = {}  # part -> ov.Model of the prepared pipeline
        self._calibration: list[dict[str, np.ndarray]] = []  # UNet inputs for INT8-convolution calibration
        self._last_part: str | None = None  # the part inferred last; its scratch is freed when another runs
        self._hybrid = optimizations.int8_convolutions
        self._int8 = optimizations.int8_weights or self._hybrid
        self._convs_quantized = False  # whether the prepared UNet's IR really has quantized convolutions

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else DEFAULT_CACHE_DIR

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def precision(self) -> str:
        if self._hybrid and self._convs_quantized:
            return self._precision + " + int8 weights + int8 convolutions"
        return self._precision + (" + int8 weights" if self._int8 else "")

    @property
    def variant(self) -> str:
        version = self._ov.get_version().split("-")[0]
        kind = "int8h" if self._hybrid else ("int8" if self._int8 else "f32")
        return f"ov{version}-c{CONVERSION_VERSION}-{kind}"

    # -- cache of IR

    def cached_components(self, identity: str) -> set[str]:
        """Pipeline components whose every IR part is valid in the disk cache."""
        return {component for component, parts in PARTS_OF.items()
                if all(self.ir_cache.valid(identity, self.variant, p) for p in parts)}

    def _ir(self, part: str, component) -> Any:
        """The part's ov.Model from the disk cache, or converted (and cached) from `component`."""
        identity = self._identity
        model = self.ir_cache.load(self.core, identity, self.variant, part) if identity else None
        if model is not None:
            return model
        if component is None or _is_meta(component):
            raise RuntimeUnavailable(f"OpenVINO IR for {part} is missing from the cache and no weights are loaded; "
                                     f"load the model again.")
        start = time.perf_counter()
        model = convert_part(part, component)
        if self._int8:
            model = self._compress(part, model)
        self.conversions.append((part, time.perf_counter() - start))
        log.info("converted %s to OpenVINO in %.1f s", part, time.perf_counter() - start)
        if identity and self.ir_cache.save(model, identity, self.variant, part):
            # Read back the saved copy: its weights are file-backed, the converted one holds them in RAM.
            del model
            gc.collect()
            model = self.ir_cache.load(self.core, identity, self.variant, part)
        return model

    def _compress(self, part: str, model):
        import nncf

        if self._hybrid and part == "unet":
            if {p.get_any_name() for p in model.inputs} == {"sample", "timestep", "encoder_hidden_states"} \
                    and self._calibration:
                return hybrid_quantize(model, self._calibration)
            log.info("INT8 convolutions need SD 1.x/2.x UNet inputs; this UNet gets int8 weights only")
        return nncf.compress_weights(model)

    def _prepare_calibration(self, pipe) -> None:
        """UNet inputs for INT8-convolution calibration, made before the UNet is converted, as a
        denoising loop with guidance makes them: latents noised over the schedule, timesteps from
        999 down, [empty prompt, prompt] states from the model's own text encoder."""
        self._calibration = []
        encoder, tokenizer = getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None)
        alphas = getattr(pipe.scheduler, "alphas_cumprod", None)
        if not (self._hybrid and encoder is not None and tokenizer is not None and alphas is not None):
            return
        if self._identity and self.ir_cache.valid(self._identity, self.variant, "unet"):
            return  # the quantized UNet comes from the cache; nothing to calibrate
        ids = tokenizer([""] + CALIBRATION_PROMPTS, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        if _is_meta(encoder):  # its IR is cached and its weights were never built: run the IR
            compiled = self.core.compile_model(self._ir("text_encoder", None), "CPU")
            states = np.concatenate([np.array(compiled({"input_ids": row[None].numpy()})[0]) for row in ids])
        else:
            with torch.no_grad():
                states = encoder(ids)[0].float().numpy()
        rng = np.random.default_rng(0)
        shape = (2, pipe.unet.config.in_channels, CALIBRATION_LATENT, CALIBRATION_LATENT)
        for i, t in enumerate(CALIBRATION_TIMESTEPS):
            a = float(alphas[t])
            sample = np.sqrt(a) * rng.standard_normal(shape) + np.sqrt(1 - a) * rng.standard_normal(shape)
            cond = states[1 + i % (len(states) - 1)]
            self._calibration.append({"sample": sample.astype(np.float32),
                                      "timestep": np.array([float(t)], np.float32),
                                      "encoder_hidden_states": np.stack([states[0], cond]).astype(np.float32)})

    # -- preparing a pipeline

    def prepare(self, model) -> None:
        pipe = model.pipe
        self._identity = model.identity
        self._compiled.clear()
        self._irs = {}
        self._prepare_calibration(pipe)
        for component, parts in PARTS_OF.items():
            module = getattr(pipe, component, None)
            if module is None:
                continue
            for part in parts:
                ir = self._ir(part, module)
                self._irs[part] = ir
                if part == "unet":  # said from the IR itself, so a cached one reports the same
                    self._convs_quantized = any(op.get_type_name() == "FakeQuantize" for op in ir.get_ops())
            config = module.config
            if component == "unet":
                adapter = OVUNet(self, config)
            elif component == "vae":
                adapter = OVVae(self, config)
            else:
                adapter = OVTextEncoder(self, component, config, with_projection=component == "text_encoder_2")
            setattr(pipe, component, adapter)
            del module  # the PyTorch copy goes; OpenVINO holds the weights now
        self._calibration = []  # used only while converting the UNet
        gc.collect()

    # -- compiled models per shape

    def _config(self) -> dict:
        config = {"INFERENCE_PRECISION_HINT": self._hint, "PERFORMANCE_HINT": "LATENCY"}
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
        key = (part, tuple(sorted((k, tuple(v)) for k, v in shapes.items())))
        hit = self._compiled.get(key)
        if hit is not None:
            self._compiled.move_to_end(key)
            return hit
        self._make_room(part)
        start = time.perf_counter()
        rss_before = _rss()
        model = self._irs[part].clone()
        model.reshape({name: list(shape) for name, shape in shapes.items()})
        compiled = self.core.compile_model(model, "CPU", self._config())
        del model
        drop_mapped_pages(self.ir_cache.files_root)  # the IR pages the compile read; the compiled model has its own
        seconds = time.perf_counter() - start
        self._cost[part] = max(self._cost.get(part, 0), _rss() - rss_before)
        self.compile_events.append(CompileEvent(part, key[1], seconds))
        log.info("compiled %s for %s in %.2f s", part, dict(key[1]), seconds)
        if part == "unet":
            self._precision = precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        self._compiled[key] = compiled
        same_part = [k for k in self._compiled if k[0] == part]
        for old in same_part[:-self.max_shapes]:  # oldest first
            del self._compiled[old]
        return compiled

    def _make_room(self, part: str) -> None:
        """Each compiled shape holds its own copy of the weights (measured: about 5 GiB for an
        INT8 SD 1.5 UNet on this plugin); drop the least recently used shapes before a compile
        that would not fit in the memory that is left."""
        import psutil

        need = self._cost.get(part, 0) * 1.1 + RESERVE_BYTES
        while self._compiled and psutil.virtual_memory().available < need:
            old, _ = self._compiled.popitem(last=False)
            gc.collect()
            log.info("evicted compiled %s for %s to make room", old[0], dict(old[1]))

    def infer(self, part: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if part != self._last_part:  # before compiling this part, so a compile never meets the other's scratch
            self._release_scratch(self._last_part)
            self._last_part = part
        compiled = self.compiled(part, {k: v.shape for k, v in inputs.items()})
        result = compiled(inputs)
        # Copy: the request's output buffers are reused by the next call.
        return [np.array(result[out]) for out in compiled.outputs]

    def _release_scratch(self, part: str | None) -> None:
        """Free the intermediate buffers of `part`'s compiled models when another part takes over.

        Each compiled model keeps its activation buffers between calls; the UNet's are about
        1 GiB at 512x512 with guidance, and would otherwise still be held while the VAE decodes
        (measured: peak 4.66 -> 3.60 GiB for an SD 1.5 image). They are allocated again on the
        part's next call, which costs far less than one UNet step."""
        for (name, _), compiled in self._compiled.items():
            if name == part:
                try:
                    compiled.release_memory()
                except (AttributeError, RuntimeError):  # older OpenVINO, or a request still running
                    pass

    # -- warm-up

    def _shapes_for(self, model, width: int, height: int, batch: int, guidance: bool = True) -> dict[str, dict]:
        pipe = model.pipe
        f = model.vae_scale_factor
        lh, lw = height // f, width // f
        unet_batch = batch * (2 if guidance else 1)
        unet_inputs = _unet_inputs(pipe.unet.config, unet_batch, lh, lw)
        shapes = {"unet": {k: s for k, (s, _) in unet_inputs.items()},
                  "vae_decoder": {"latent": [batch, pipe.unet.config.in_channels, lh, lw]}}
        for part in ("text_encoder", "text_encoder_2"):
            if part in self._irs:
                shapes[part] = {"input_ids": [1, TEXT_LENGTH]}
        return shapes

    def warmup(self, model, shapes: list[tuple[int, int, int]]) -> list[WarmupResult]:
        results = []
        for shape in shapes:
            width, height, batch = shape.width, shape.height, shape.batch
            before = len(self.compile_events)
            start = time.perf_counter()
            for part, part_shapes in self._shapes_for(model, width, height, batch).items():
                self.compiled(part, part_shapes)
            compiled = len(self.compile_events) > before
            results.append(WarmupResult(width, height, batch, time.perf_counter() - start, compiled=compiled,
                                        state="compiled" if compiled else "already warm"))
        return results

    def describe(self) -> str:
        return f"openvino on CPU ({self.precision}), IR cache {self.cache_root}"


def drop_mapped_pages(folder: Path) -> int:
    """Take this process's resident pages of read-only file mappings under `folder` out of its RSS.

    OpenVINO memory-maps an IR's .bin and reads all of it while compiling. The compiled model
    keeps its own (repacked) weights, yet the mapping stays, and its pages stay counted in RSS:
    0.8 GiB for an INT8 SD 1.5 UNet (measured: compiled 1.83 -> 1.03 GiB, first inference
    faults back 0.02 GiB). MADV_DONTNEED on a mapping that cannot be written drops nothing but
    the process's page-table entries: the file stays in the kernel's page cache, and a page that
    is read again faults back in. Linux only; elsewhere a no-op. Returns the bytes advised."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    prefix = str(Path(folder).resolve()) + os.sep
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except (OSError, AttributeError):
        return 0
    advised = 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "w" in fields[1] or not fields[5].strip().startswith(prefix):
            continue  # only read-only mappings: no page of them can hold a change that would be lost
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(start, end - start, 4) == 0:  # MADV_DONTNEED
            advised += end - start
    return advised


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _is_meta(module) -> bool:
    try:
        return next(module.parameters()).is_meta
    except (StopIteration, AttributeError):
        return False
