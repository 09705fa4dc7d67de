import pytest

from engine.errors import UserError
from engine.options import load_preset, preset_names


def test_shipped_presets_load():
    assert {"balanced", "quality"} <= set(preset_names())
    for name in preset_names():
        preset = load_preset(name)
        assert preset.name == name and preset.description


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs", ".hidden", "", "nope"])
def test_bad_preset_names(name):
    with pytest.raises(UserError):
        load_preset(name)
