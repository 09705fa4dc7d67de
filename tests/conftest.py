import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Converted models and compiled blobs go to a per-run folder, not the user's cache (inherited by app processes).
os.environ["FASTSD_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastsd-test-cache-")


@pytest.fixture(scope="session")
def tiny_engine():
    from engine import Engine

    engine = Engine(runtime="pytorch")
    engine.load("builtin:tiny")
    return engine


@pytest.fixture(scope="session")
def tiny_saved(tmp_path_factory):
    """builtin:tiny saved as a diffusers folder and as original-format single files."""
    import torch
    from safetensors.torch import save_file

    from engine.models import load_model
    from ldm_export import pipeline_to_ldm

    root = tmp_path_factory.mktemp("tiny_model")
    model = load_model("builtin:tiny")
    model.pipe.save_pretrained(root / "folder")
    state = pipeline_to_ldm(model.pipe)
    save_file(state, str(root / "tiny.safetensors"))
    torch.save({"state_dict": state}, root / "tiny.ckpt")
    return {"model": model, "folder": root / "folder", "safetensors": root / "tiny.safetensors",
            "ckpt": root / "tiny.ckpt", "root": root}
