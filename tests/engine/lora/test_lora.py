"""LoRA: both file formats fuse to W + weight * (alpha/rank) * up @ down, on PyTorch and OpenVINO alike;
bad LoRAs are one clear message and the model keeps serving."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine import Engine
from engine.errors import UserError
from engine.lora.tags import LoraUse, parse_prompt, with_tag, without_tags
from engine.store.metadata import format_parameters, parse_parameters
from lora_files import ALPHA, LAYERS, RANK, REQUEST, known_matrices, save_kohya, save_peft

# (component, module): a Linear, a 3x3 Conv2d, a 1x1 Conv2d given a Linear-shaped LoRA, a text-encoder Linear
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from engine.models.loading import load_model

    root = tmp_path_factory.mktemp("models")
    (root / "lora" / "sub").mkdir(parents=True)
    pipe = load_model("builtin:tiny").pipe
    matrices = known_matrices(pipe)
    save_kohya(root / "lora" / "known-kohya.safetensors", matrices)
    save_peft(root / "lora" / "sub" / "known-peft.safetensors", matrices)
    save_kohya(root / "lora" / "other.safetensors", known_matrices(pipe, seed=1))
    return root


@pytest.fixture(scope="module")
def engine(models_dir):
    engine = Engine(runtime="pytorch", models_dir=models_dir)
    engine.load("builtin:tiny")
    engine.preview_every = 0
    return engine


def weights(engine):
    return {key: getattr(engine.model.pipe, key[0]).get_submodule(key[1]).weight.detach().clone() for key in LAYERS}


@pytest.mark.parametrize("name", ["known-kohya", "sub/known-peft"])
def test_fused_weights_are_w_plus_scaled_up_down_and_restore_exactly(engine, models_dir, name):
    before = weights(engine)
    matrices = known_matrices(engine.model.pipe)
    result = engine.txt2img({**REQUEST, "prompt": f"a red circle <lora:{name}:0.7>"})
    assert result.readout.details["lora"] == f"{name} x0.7 (4 of 4 layers)"
    assert result.readout.details["lora_change"].startswith("fused in")
    fused = weights(engine)
    for key, (down, up) in matrices.items():
        expected = before[key] + 0.7 * (ALPHA / RANK) * (up @ down.reshape(RANK, -1)).reshape(before[key].shape)
        torch.testing.assert_close(fused[key], expected, rtol=1e-5, atol=1e-5)
    engine.txt2img(REQUEST)  # no tag: the LoRA comes off
    for key, w in weights(engine).items():
        assert torch.equal(w, before[key]), key


def test_lora_changes_the_picture_and_parameters_keep_the_tag(engine):
    plain = np.asarray(engine.txt2img(REQUEST).images[0], dtype=np.float32)
    result = engine.txt2img({**REQUEST, "prompt": "a red circle <lora:known-kohya:1>"})
    assert np.abs(np.asarray(result.images[0], dtype=np.float32) - plain).mean() > 1.0
    text = format_parameters({**result.parameters})
    assert parse_parameters(text)["prompt"] == "a red circle <lora:known-kohya:1>"  # PNG info -> txt2img brings it back


def test_two_loras_add_up(engine):
    engine.txt2img(REQUEST)
    before = weights(engine)
    a, b = known_matrices(engine.model.pipe), known_matrices(engine.model.pipe, seed=1)
    engine.txt2img({**REQUEST, "prompt": "x <lora:known-kohya:0.5> <lora:other:-1>"})
    key = LAYERS[0]
    expected = before[key] + (ALPHA / RANK) * (0.5 * a[key][1] @ a[key][0] - b[key][1] @ b[key][0])
    torch.testing.assert_close(weights(engine)[key], expected, rtol=1e-5, atol=1e-5)
    engine.txt2img(REQUEST)


@pytest.mark.parametrize("prompt, message", [
    ("x <lora:missing>", "not found"),
    ("x <lora:../escape>", "not a path"),
    ("x <lora:/etc/passwd>", "not a path"),
    ("x <lora:known-kohya:abc>", "must be a number"),
    ("x <lora:known-kohya:9>", "between"),
    ("x <lora:damaged>", "cannot be read"),
    ("x <lora:nomatch>", "0 matched"),
    ("x <lora:xl>", "for SDXL models"),
    ("x <lora:wrongshape>", "made for another model"),
])
def test_bad_loras_are_one_message_and_the_model_keeps_serving(engine, models_dir, prompt, message):
    lora_dir = models_dir / "lora"
    (lora_dir / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(8, 4)}, str(lora_dir / "nomatch.safetensors"))
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4)},
              str(lora_dir / "xl.safetensors"))
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(4, 7, 3, 3),
               "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(32, 4, 1, 1)},
              str(lora_dir / "wrongshape.safetensors"))
    before = weights(engine)
    with pytest.raises(UserError, match=message):
        engine.txt2img({**REQUEST, "prompt": prompt})
    assert all(torch.equal(w, before[k]) for k, w in weights(engine).items())
    assert engine.txt2img(REQUEST).images  # still serving


def test_prompt_syntax():
    assert parse_prompt("a cat, <lora:x:0.8> on a mat <LORA:y>") == (
        "a cat, on a mat", (LoraUse("x", 0.8), LoraUse("y", 1.0)))
    assert parse_prompt("<lora:x:0>")[1] == ()
    assert parse_prompt("<lora:x:0.2> <lora:x:0.5>")[1] == (LoraUse("x", 0.5),)
    assert with_tag("a cat", "x", 0.8) == "a cat <lora:x:0.8>"
    assert with_tag("a cat <lora:x:0.8>", "x", 1.2) == "a cat <lora:x:1.2>"
    assert without_tags("a cat <lora:x:0.8> <lora:y:1> on a mat", {"x"}) == "a cat <lora:y:1> on a mat"


def test_openvino_runs_the_lora_like_pytorch_and_caches_the_fused_parts(engine, models_dir, tiny_ov_cache):
    ov = Engine(runtime="openvino", models_dir=models_dir, cache_dir=tiny_ov_cache)  # the plain parts are cached
    ov.load("builtin:tiny")
    ov.preview_every = 0
    lora_request = {**REQUEST, "prompt": "a red circle <lora:known-kohya:1>"}
    plain = np.asarray(ov.txt2img(REQUEST).images[0], dtype=np.float32)
    first = ov.txt2img(lora_request)
    assert first.readout.details["lora_change"].startswith("fused, converted in")
    got = np.asarray(first.images[0], dtype=np.float32)
    want = np.asarray(engine.txt2img(lora_request).images[0], dtype=np.float32)
    assert np.abs(got - want).mean() < 2.0, "OpenVINO and PyTorch disagree with the LoRA fused"
    assert np.abs(got - plain).mean() > 1.0, "the LoRA changed nothing on OpenVINO"
    assert ov.txt2img(REQUEST).readout.details["lora_change"].startswith("from cache")  # back to the plain IR
    again = ov.txt2img(lora_request)
    assert again.readout.details["lora_change"].startswith("fused, from cache")
    assert np.abs(np.asarray(again.images[0], dtype=np.float32) - got).max() == 0
    with pytest.raises(UserError, match="not found"):
        ov.txt2img({**REQUEST, "prompt": "x <lora:missing>"})
    assert ov.txt2img(REQUEST).images


def test_kohya_sdxl_files_name_the_sgm_blocks_and_are_mapped(tmp_path):
    """kohya trains SDXL on the sgm UNet: input_blocks_3_1 is down_blocks.1.attentions.0 on this layout
    (one layer per block, two blocks); the expected names are worked out by hand from that layout."""
    from engine.lora.plan import plan
    from engine.models.loading import load_model

    model = load_model("builtin:tiny-sdxl")
    expected = {
        "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "lora_unet_input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
        "lora_unet_input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "lora_unet_middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "lora_unet_output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
        "lora_unet_output_blocks_3_0_skip_connection": "up_blocks.1.resnets.1.conv_shortcut",
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": "text_model.encoder.layers.0.self_attn.k_proj",
    }
    state = {}
    for key, name in expected.items():
        component = model.pipe.text_encoder_2 if key.startswith("lora_te2") else model.pipe.unet
        w = component.get_submodule(name).weight
        state[f"{key}.lora_down.weight"] = torch.zeros((2, *w.shape[1:]))
        state[f"{key}.lora_up.weight"] = torch.zeros((w.shape[0], 2, 1, 1)[: w.dim()])
    (tmp_path / "lora").mkdir()
    save_file(state, str(tmp_path / "lora" / "xl.safetensors"))
    result = plan(model.pipe, "sdxl", LoraUse("xl"), tmp_path)
    assert result.unmatched == 0
    assert {name for _, name, _ in result.pairs} == set(expected.values())
    with pytest.raises(UserError, match="for SDXL models; the loaded model is SD 1.x"):
        plan(model.pipe, "sd1", LoraUse("xl"), tmp_path)


def test_older_diffusers_names_and_rslora_scale(tmp_path):
    """attn processors' to_out_lora / to_q_lora (old diffusers files), CLIP's processor names, and rsLoRA's
    alpha/sqrt(rank) scale from the PEFT metadata."""
    from engine.lora.plan import plan
    from engine.models.loading import load_model

    pipe = load_model("builtin:tiny").pipe
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    clip = "text_model.encoder.layers.0.self_attn"
    state = {}
    for key, width in ((f"unet.{attn}.processor.to_out_lora", 32), (f"unet.{attn}.processor.to_q_lora", 32),
                       (f"text_encoder.{clip}.to_out_lora", pipe.text_encoder.config.hidden_size)):
        state[f"{key}.down.weight"] = torch.ones(4, width)
        state[f"{key}.up.weight"] = torch.ones(width, 4)
    (tmp_path / "lora").mkdir()
    save_file(state, str(tmp_path / "lora" / "old.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 4,
                                                             "unet.use_rslora": True})})
    result = plan(pipe, "sd1", LoraUse("old"), tmp_path)
    assert result.unmatched == 0
    assert {n for _, n, _ in result.pairs} == {f"{attn}.to_out.0", f"{attn}.to_q", "encoder.layers.0.self_attn.out_proj"}
    unet_layer = next(layer for c, _, layer in result.pairs if c == "unet")
    assert unet_layer.scale == pytest.approx(8 / 4 ** 0.5)


def test_a_lora_file_replaced_on_disk_is_fused_again(engine, models_dir):
    path = models_dir / "lora" / "changing.safetensors"
    save_kohya(path, known_matrices(engine.model.pipe, seed=5))
    engine.txt2img(REQUEST)
    before = weights(engine)
    engine.txt2img({**REQUEST, "prompt": "x <lora:changing:1>"})
    import os
    save_kohya(path, known_matrices(engine.model.pipe, seed=6))
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse clock
    result = engine.txt2img({**REQUEST, "prompt": "x <lora:changing:1>"})
    assert result.readout.details["lora_change"].startswith("fused")
    down, up = known_matrices(engine.model.pipe, seed=6)[LAYERS[0]]
    torch.testing.assert_close(weights(engine)[LAYERS[0]], before[LAYERS[0]] + (ALPHA / RANK) * up @ down,
                               rtol=1e-5, atol=1e-5)
    engine.txt2img(REQUEST)
