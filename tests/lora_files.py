"""LoRA files the tests write: known matrices for a pipeline's layers, saved in kohya and PEFT key names."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

RANK, ALPHA = 4, 2.0
LAYERS = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
          ("unet", "down_blocks.0.resnets.0.conv1"),
          ("unet", "up_blocks.1.attentions.0.proj_in"),
          ("text_encoder", "encoder.layers.0.self_attn.q_proj")]  # transformers 5 names (no text_model.)
REQUEST = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "guidance": 5.0, "sampler": "Euler",
           "seed": 3}


def known_matrices(pipe, seed=0):
    """(component, module) -> (down, up), the LoRA's matrices, made from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, name in LAYERS:
        w = getattr(pipe, component).get_submodule(name).weight
        down = torch.randn((RANK, w[0].numel()), generator=g) * 0.5
        if w.dim() == 4 and w.shape[-1] == 3:
            down = down.reshape(RANK, w.shape[1], 3, 3)
        up = torch.randn((w.shape[0], RANK), generator=g) * 0.5
        out[(component, name)] = (down, up)
    return out


def file_name(component, name):
    """What LoRA files call a layer: CLIP's layers under text_model. (as before transformers 5)."""
    return ("text_model." if component.startswith("text_encoder") else "") + name


def save_kohya(path, matrices):
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    state = {}
    for (component, name), (down, up) in matrices.items():
        key = prefix[component] + file_name(component, name).replace(".", "_")
        state[f"{key}.lora_down.weight"] = down.contiguous()
        state[f"{key}.lora_up.weight"] = (up[:, :, None, None] if down.dim() == 4 else up).contiguous()
        state[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(state, str(path))


def save_peft(path, matrices):
    """diffusers' own layout: unet.<module>.lora_A/lora_B, alpha in the lora_adapter_metadata JSON."""
    state = {}
    for (component, name), (down, up) in matrices.items():
        state[f"{component}.{file_name(component, name)}.lora_A.weight"] = down.contiguous()
        state[f"{component}.{file_name(component, name)}.lora_B.weight"] = (up[:, :, None, None] if down.dim() == 4 else up).contiguous()
    meta = {"unet.lora_alpha": ALPHA, "unet.r": RANK, "text_encoder.lora_alpha": ALPHA, "text_encoder.r": RANK}
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
