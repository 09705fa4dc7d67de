"""Pickers: models, VAEs and tiny autoencoders under --models-dir are listed, loaded by name, and names that
leave the folder are refused."""
import numpy as np
import pytest
import torch
from ldm_export import vae_to_ldm
from safetensors.torch import save_file

from engine import Engine, UserError
from engine.lora.tags import available as available_loras
from engine.models.loading import load_model
from engine.models.sources import available_models, available_tiny_autoencoders, available_vaes

REQ = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 1, "seed": 2, "sampler": "Euler"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """What a user puts in the folder: a checkpoint, a diffusers folder, VAEs both ways, a tiny autoencoder, a
    LoRA, plus a hidden file and a link that leads out of the folder."""
    root = tmp_path_factory.mktemp("models")
    outside = tmp_path_factory.mktemp("outside")
    (root / "sd" / "mine").mkdir(parents=True)
    (root / "sd" / "mine" / "model_index.json").write_text("{}")
    (root / "ckpt.safetensors").write_bytes(b"")
    vae = load_model("builtin:tiny").pipe.vae
    with torch.no_grad():
        vae.decoder.conv_out.bias += 0.5  # a VAE that visibly decodes differently
    (root / "vae").mkdir()
    vae.save_pretrained(root / "vae" / "brighter")
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(vae_to_ldm(state, vae.config), str(root / "vae" / "brighter.safetensors"))  # A1111's key names
    (root / "vae" / ".hidden.safetensors").write_bytes(b"")
    (outside / "escape.safetensors").write_bytes(b"")
    (root / "vae" / "escape.safetensors").symlink_to(outside / "escape.safetensors")
    (root / "taesd" / "mytaesd").mkdir(parents=True)
    (root / "taesd" / "mytaesd" / "config.json").write_text("{}")
    (root / "lora").mkdir()
    (root / "lora" / "style.safetensors").write_bytes(b"")
    return root


def test_pickers_list_what_is_in_the_folder_and_nothing_outside(models_dir):
    names = [n for n, _ in available_models(models_dir)]
    assert "sd/mine" in names and "ckpt.safetensors" in names and "builtin:tiny" in names
    assert not any(n.startswith(("vae/", "taesd/", "lora/")) for n in names)
    assert available_vaes(models_dir) == ["vae/brighter", "vae/brighter.safetensors"]  # no hidden, no escape
    assert available_tiny_autoencoders(models_dir) == ["builtin:taesd", "builtin:taesdxl", "taesd/mytaesd"]
    assert "style" in available_loras(models_dir)


def test_a_vae_from_the_folder_decodes_and_both_formats_agree(engine):
    engine.load("builtin:tiny")
    plain = np.asarray(engine.txt2img(REQ).images[0], np.int16)
    engine.load("builtin:tiny", allow_any_path=False, vae="vae/brighter.safetensors")
    single = np.asarray(engine.txt2img(REQ).images[0], np.int16)
    assert engine.model.vae == "vae/brighter.safetensors" and "vae:" in engine.model.weights_key
    engine.load("builtin:tiny", allow_any_path=False, vae="vae/brighter")
    folder = np.asarray(engine.txt2img(REQ).images[0], np.int16)
    engine.load("builtin:tiny")  # back to the model's own VAE for the other tests
    assert single.mean() > plain.mean() + 20  # the +0.5 bias made it brighter
    assert np.abs(single - folder).max() <= 1  # the LDM names were mapped right


@pytest.fixture(scope="module")
def engine(models_dir):
    engine = Engine(runtime="pytorch", models_dir=models_dir)
    engine.load("builtin:tiny")
    return engine


@pytest.mark.parametrize("name", ["/etc", "../outside", "vae/escape.safetensors"])
def test_names_outside_the_folder_are_refused(engine, name):
    with pytest.raises(UserError, match="models folder|outside"):
        engine.load("builtin:tiny", allow_any_path=False, vae=name)
    with pytest.raises(UserError, match="models folder|outside|neither"):
        engine.set_tiny_autoencoder(name, allow_any_path=False)
    with pytest.raises(UserError, match="models folder|outside|neither"):
        engine.load(name, allow_any_path=False)
    assert engine.model.name == "builtin:tiny" and engine.model.vae is None  # the old model keeps serving


def test_tiny_autoencoder_picker_switches_the_decoder(engine):
    assert engine.set_tiny_autoencoder("builtin:taesdxl") is not None  # SDXL latents: says why it cannot act
    assert engine.model.taesd is None
    assert engine.set_tiny_autoencoder("builtin:taesd") is None and engine.model.taesd is not None
    assert engine.model.taesd_name == "builtin:taesd"
    assert engine.set_tiny_autoencoder("") == engine.option_reasons()["tiny_vae"] and engine.model.taesd is None
