"""Cheap live previews: project 4 latent channels to RGB with a fixed linear map (no VAE run)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from engine.system.tensors import full_precision, host_float

# Least-squares fits of latent -> RGB used by common SD UIs for their "approx" previews.
SD_FACTORS = torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                           [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]])
SDXL_FACTORS = torch.tensor([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                             [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]])


def latents_to_rgb(latents: torch.Tensor, sdxl: bool = False, scale: int = 8) -> Image.Image:
    """First image of a (B, 4, h, w) latent batch -> an RGB preview of the output size."""
    factors = SDXL_FACTORS if sdxl else SD_FACTORS
    with full_precision():  # called from inside the denoising loop, where autocast may be on
        rgb = torch.einsum("chw,cr->hwr", host_float(latents[0][:4]), factors)
        arr = ((rgb.clamp(-1, 1) + 1) * 127.5).numpy().astype(np.uint8)
    image = Image.fromarray(arr)
    return image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
