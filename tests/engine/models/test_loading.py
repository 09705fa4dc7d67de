import numpy as np
import pytest
import torch

from engine import Engine, ModelLoadError
from engine.models.loading import build_builtin, family_of_keys, load_model, resolve_source


def test_builtin_tiny_is_deterministic():
    _, a = build_builtin("tiny")
    _, b = build_builtin("tiny")
    for (ka, va), (kb, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_builtin_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_builtin("tiny")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_builtin():
    with pytest.raises(ModelLoadError, match="builtin:tiny"):
        resolve_source("builtin:nope")


def test_save_and_load_diffusers_folder(tiny_saved):
    model = load_model(str(tiny_saved["folder"]))
    assert model.family == "sd1" and model.source.kind == "folder"
    ref = tiny_saved["model"].pipe.unet.state_dict()
    for k, v in model.pipe.unet.state_dict().items():
        assert torch.equal(v, ref[k])


def _generate(source, **load_kwargs):
    engine = Engine(runtime="pytorch")
    engine.load(str(source), **load_kwargs)
    r = engine.txt2img({"prompt": "a blue square", "width": 64, "height": 64, "steps": 3, "seed": 3})
    return np.asarray(r.images[0])


def test_single_safetensors_file_matches_folder(tiny_saved):
    folder_image = _generate(tiny_saved["folder"])
    file_image = _generate(tiny_saved["safetensors"], config_dir=tiny_saved["folder"])
    assert np.array_equal(folder_image, file_image)


def test_ckpt_loads_through_weights_only(tiny_saved):
    model = load_model(str(tiny_saved["ckpt"]), config_dir=tiny_saved["folder"])
    assert model.family == "sd1"


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, path)
    with pytest.raises(ModelLoadError, match="weights-only"):
        load_model(str(path))
    assert not marker.exists()


def test_single_file_offline_without_config_says_what_to_do(tiny_saved, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="--model-config"):
        load_model(str(tiny_saved["safetensors"]))


def test_truncated_safetensors_is_a_clear_error(tiny_saved, tmp_path):
    data = tiny_saved["safetensors"].read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(str(broken), config_dir=tiny_saved["folder"])


def test_family_detection_from_keys():
    assert family_of_keys(["model.diffusion_model.x", "cond_stage_model.transformer.text_model.y"]) == "sd1"
    assert family_of_keys(["model.diffusion_model.x", "cond_stage_model.model.transformer.y"]) == "sd2"
    assert family_of_keys(["model.diffusion_model.x", "conditioner.embedders.1.model.y"]) == "sdxl"
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion"):
        family_of_keys(["foo.bar"])


def test_sdxl_folder_is_detected_and_loaded(tmp_path):
    _, pipe = build_builtin("tiny-sdxl")
    pipe.save_pretrained(tmp_path / "xl")
    model = load_model(str(tmp_path / "xl"))
    assert model.family == "sdxl" and type(model.pipe).__name__ == "StableDiffusionXLPipeline"


def test_folder_without_model_index(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(str(tmp_path / "empty"))


def test_remote_names_stay_inside_models_dir(tmp_path, tiny_saved):
    models = tmp_path / "models"
    models.mkdir()
    (models / "mine").symlink_to(tiny_saved["folder"], target_is_directory=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    # a link out of the folder, an absolute path, '..': all "not listed", one answer whether or not they exist
    for name in ("mine", str(tiny_saved["folder"]), "../outside"):
        with pytest.raises(ModelLoadError, match="not one this server lists"):
            resolve_source(name, models_dir=models, allow_any_path=False)
    (models / "ok.safetensors").write_bytes(b"")
    assert resolve_source("ok.safetensors", models_dir=models, allow_any_path=False).kind == "file"
    assert resolve_source("owner/name", models_dir=models, allow_any_path=False).kind == "hub"
    with pytest.raises(ModelLoadError, match="not one this server lists"):  # hub ids: the operator's choice
        resolve_source("owner/name", models_dir=models, allow_any_path=False, allow_hub=False)


def test_identity_is_stable_across_processes():
    import subprocess
    import sys

    from appserver import ROOT

    code = "from engine.models.sources import model_identity, resolve_source; print(model_identity(resolve_source('builtin:tiny')))"
    ids = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout.strip()
           for _ in range(2)}
    assert len(ids) == 1 and ids.pop().startswith("builtin-tiny-")
