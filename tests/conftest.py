import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent  # the repository and tests/ are on sys.path: pyproject.toml's pytest pythonpath
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Converted models and compiled blobs go to a per-run folder, not the user's cache (inherited by app processes).
os.environ["FASTSD_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastsd-test-cache-")


@pytest.fixture(scope="session")
def tiny_engine():
    from engine import Engine
    from engine.options import Optimizations

    # fp32 on every CPU, so a test means the same wherever it runs; tests/engine/runtimes/test_precision.py forces each precision.
    engine = Engine(runtime="pytorch", optimizations=Optimizations(precision="fp32"))
    engine.load("builtin:tiny")
    return engine


@pytest.fixture(scope="session")
def tiny_saved(tmp_path_factory):
    """builtin:tiny saved as a diffusers folder and as original-format single files."""
    import torch
    from ldm_export import pipeline_to_ldm
    from safetensors.torch import save_file

    from engine.models.loading import load_model

    root = tmp_path_factory.mktemp("tiny_model")
    model = load_model("builtin:tiny")
    model.pipe.save_pretrained(root / "folder")
    state = pipeline_to_ldm(model.pipe)
    save_file(state, str(root / "tiny.safetensors"))
    torch.save({"state_dict": state}, root / "tiny.ckpt")
    return {"model": model, "folder": root / "folder", "safetensors": root / "tiny.safetensors",
            "ckpt": root / "tiny.ckpt", "root": root}


@dataclass
class ConvertedCache:
    """A cache folder a model was converted into on OpenVINO (once per session), and the engine that did it."""
    folder: Path
    engine: Any

    def copy(self, dest: Path) -> Path:
        """A private copy, valid as a cache (entries are keyed by model identity and variant, not by place)."""
        shutil.copytree(self.folder, dest)
        return dest


def _convert(folder: Path, name: str, **options) -> ConvertedCache:
    from engine import Engine
    from engine.options import Optimizations

    engine = Engine(runtime="openvino", cache_dir=folder, outputs_dir=None, optimizations=Optimizations(**options))
    engine.load(name)
    assert engine.runtime.conversions  # really converted here
    return ConvertedCache(folder, engine)


# Converting takes 10-30 s a model: tests whose subject is not the conversion copy these instead.
@pytest.fixture(scope="session")
def ov_tiny(tmp_path_factory):
    """builtin:tiny on OpenVINO, fp32, default options."""
    return _convert(tmp_path_factory.mktemp("ov-tiny"), "builtin:tiny")


@pytest.fixture(scope="session")
def ov_tiny_sdxl(tmp_path_factory):
    """builtin:tiny-sdxl on OpenVINO, fp32, default options (the engine is not kept)."""
    return ConvertedCache(_convert(tmp_path_factory.mktemp("ov-tiny-sdxl"), "builtin:tiny-sdxl").folder, None)


@pytest.fixture(scope="session")
def ov_tiny_int8h_deepcache(tmp_path_factory):
    """builtin:tiny with int8 convolutions and DeepCache: the full and shallow UNet graphs, the VAE and the text
    encoder, all in the -int8h variant (the engine is not kept)."""
    cache = _convert(tmp_path_factory.mktemp("ov-tiny-int8h-dc"), "builtin:tiny", int8_convolutions="on",
                     deepcache_interval=2)
    assert {"unet_deep", "unet_shallow"} <= {part for part, _ in cache.engine.runtime.conversions}
    return ConvertedCache(cache.folder, None)


@pytest.fixture
def tiny_ov_cache(ov_tiny, tmp_path):
    """This test's own copy of a cache folder holding builtin:tiny converted (fp32, default options)."""
    return ov_tiny.copy(tmp_path / "ov-cache")
