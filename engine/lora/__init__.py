"""LoRA: the files (under <models-dir>/lora and the built-in assets/lora), AUTOMATIC1111's `<lora:name:weight>`
prompt syntax, the two file formats people have, and fusing into a pipeline's weights.

Formats: kohya / AUTOMATIC1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*`/`lora_te2_*` for SDXL, `.lora_down`,
`.lora_up`, `.alpha`; SDXL files name the UNet's blocks the sgm way, `input_blocks_4_1_...`, mapped here) and
diffusers / PEFT (`unet.<module>.lora_A/lora_B`, `.lora.down/.lora.up`, `.lora_linear_layer.*`,
`<attn>.processor.to_q_lora.*`). Each layer is matched by name to a Linear or Conv2d of the pipeline and fused
as W + weight * (alpha / rank) * up @ down. The weights a LoRA touched are kept and written back exactly when
the set changes, so no rounding accumulates. Fusing keeps one code path for every runtime: PyTorch runs the
fused weights, OpenVINO converts them (its IR cache is keyed by the LoRA set, see `component_identity`).
"""
