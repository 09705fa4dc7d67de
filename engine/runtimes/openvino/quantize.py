"""INT8: weight compression for every part, and for SD 1.x/2.x UNets full int8 convolutions with
activation ranges calibrated on inputs a denoising loop would feed them."""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from engine.runtimes.openvino.convert import TEXT_LENGTH

log = logging.getLogger(__name__)

CALIBRATION_PROMPTS = ["a photograph of a cat sitting on a red sofa", "a watercolour landscape with mountains",
                       "a portrait of an old man, oil painting", "a red circle on a blue background"]
CALIBRATION_TIMESTEPS = (999, 900, 750, 600, 450, 300, 150, 20)
CALIBRATION_LATENT = 32  # calibrate at 256x256: activation ranges carry over, at a quarter of the cost of 512
PLAIN_UNET_INPUTS = {"sample", "timestep", "encoder_hidden_states"}


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


def compress(part: str, model, hybrid: bool, calibration: list[dict[str, np.ndarray]], component=None):
    """int8 weights; with `hybrid`, int8 convolutions for a UNet calibration can feed (DeepCache's shallow
    graph is calibrated on the deep features the whole UNet, `component`, makes from the same inputs)."""
    import nncf

    if hybrid and part in ("unet", "unet_deep", "unet_shallow"):
        inputs = {p.get_any_name() for p in model.inputs} - {"deep"}
        if inputs == PLAIN_UNET_INPUTS and calibration:
            if part == "unet_shallow":
                calibration = with_deep_features(component, calibration)
            return hybrid_quantize(model, calibration)
        log.info("INT8 convolutions need SD 1.x/2.x UNet inputs; this UNet gets int8 weights only")
    return nncf.compress_weights(model)


def with_deep_features(unet, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Each calibration sample plus the deep features the whole PyTorch UNet computes for it."""
    from engine.runtimes.deepcache import full_forward

    out = []
    with torch.no_grad():
        for sample in samples:
            _, deep = full_forward(unet, torch.from_numpy(sample["sample"]), torch.from_numpy(sample["timestep"]),
                                   torch.from_numpy(sample["encoder_hidden_states"]))
            out.append({**sample, "deep": deep.float().numpy()})
    return out


def has_quantized_convolutions(model) -> bool:
    """Said from the IR itself, so a cached UNet reports the same as a freshly quantized one."""
    return any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def can_calibrate(pipe) -> bool:
    return (getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None
            and getattr(pipe.scheduler, "alphas_cumprod", None) is not None)


def calibration_inputs(pipe, text_states: Callable[[torch.Tensor], np.ndarray]) -> list[dict[str, np.ndarray]]:
    """UNet inputs as a denoising loop with guidance makes them: latents noised over the schedule,
    timesteps from 999 down, [empty prompt, prompt] states from `text_states(token ids)`."""
    ids = pipe.tokenizer([""] + CALIBRATION_PROMPTS, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                         return_tensors="pt").input_ids
    states = text_states(ids)
    alphas = pipe.scheduler.alphas_cumprod
    rng = np.random.default_rng(0)
    shape = (2, pipe.unet.config.in_channels, CALIBRATION_LATENT, CALIBRATION_LATENT)
    samples = []
    for i, t in enumerate(CALIBRATION_TIMESTEPS):
        a = float(alphas[t])
        sample = np.sqrt(a) * rng.standard_normal(shape) + np.sqrt(1 - a) * rng.standard_normal(shape)
        cond = states[1 + i % (len(states) - 1)]
        samples.append({"sample": sample.astype(np.float32),
                        "timestep": np.array([float(t)], np.float32),
                        "encoder_hidden_states": np.stack([states[0], cond]).astype(np.float32)})
    return samples
