import subprocess
import sys

import pytest

from app import parse_auth
from engine.errors import UserError
from engine.requests import parse_sizes
from appserver import ROOT


def run_app(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_help_lists_the_flags():
    out = run_app("--help").stdout
    for flag in ("--model", "--runtime", "--host", "--port", "--share", "--auth", "--preset", "--warmup"):
        assert flag in out


def test_missing_model_exits_with_one_line():
    r = run_app("--model", "/no/such/model.safetensors")
    assert r.returncode == 2
    assert "error: Model not found" in r.stderr and "Traceback" not in r.stderr


def test_unknown_preset_exits_cleanly():
    r = run_app("--preset", "nope")
    assert r.returncode == 2 and "Unknown preset" in r.stderr and "Traceback" not in r.stderr


def test_parse_warmup_and_auth():
    assert parse_sizes("512x512, 768X512") == [(512, 512), (768, 512)]
    for bad in ("512", "", "0x512", "axb"):
        with pytest.raises(UserError):
            parse_sizes(bad)
    assert parse_auth(["a:b", "c:d:e"]) == [("a", "b"), ("c", "d:e")]
    with pytest.raises(Exception):
        parse_auth(["nopass"])
