import argparse
import subprocess
import sys

import pytest
from appserver import ROOT

from app import build_parser, option_overrides, parse_auth
from engine.errors import UserError
from engine.requests import parse_sizes


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
    with pytest.raises(argparse.ArgumentTypeError):
        parse_auth(["nopass"])


def test_option_flags_come_from_the_option_schema():
    from engine.options import OPTION_SPECS
    from engine.runtimes import CHOICES

    specs = [spec for spec in OPTION_SPECS.values() if spec.cli]
    assert {s.flag for s in specs} >= {"--precision", "--int8-weights", "--int8-convolutions", "--compiled-blob-cache"}
    out = run_app("--help").stdout
    for spec in specs:
        assert spec.flag in out, spec.flag
    actions = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings}
    assert actions["--precision"].choices == list(OPTION_SPECS["precision"].choices)
    assert actions["--runtime"].choices == list(CHOICES)
    for spec in specs:
        if spec.kind == "bool":
            assert actions[spec.flag].help.startswith(spec.help)


def test_option_flags_override_only_what_is_given():
    parser = build_parser()
    assert option_overrides(parser.parse_args([])) == {}
    args = parser.parse_args(["--precision", "bf16", "--int8-weights"])
    assert option_overrides(args) == {"precision": "bf16", "int8_weights": True}
