import math

import pytest

from engine.errors import UserError
from engine.requests import Txt2ImgRequest, parse_request, snap_size
from engine.samplers import SAMPLER_NAMES


def test_defaults_are_valid():
    r = parse_request(Txt2ImgRequest, {})
    assert r.seed == -1 and r.sampler in SAMPLER_NAMES


@pytest.mark.parametrize("value,multiple,expected", [(250, 8, 248), (252, 8, 256), (256, 8, 256), (64, 8, 64),
                                                     (100, 64, 128), (3, 8, 8)])
def test_snap_size(value, multiple, expected):
    assert snap_size(value, multiple) == expected


def test_snapped_reports_what_changed():
    r, notices = Txt2ImgRequest(width=250, height=256).snapped(8)
    assert (r.width, r.height) == (248, 256)
    assert len(notices) == 1 and "250" in notices[0] and "248" in notices[0]
    same, none = Txt2ImgRequest(width=256, height=256).snapped(8)
    assert none == [] and same.width == 256


@pytest.mark.parametrize("field,value,needle", [
    ("width", 0, "width"), ("width", 100000, "width"), ("height", 10, "height"),
    ("steps", 0, "steps"), ("steps", 10000, "steps"), ("sampler", "Heun++ 9M", "Unknown sampler"),
    ("guidance", math.nan, "guidance"), ("guidance", math.inf, "guidance"), ("seed", -5, "seed"),
    ("batch_size", 0, "batch_size"), ("batch_size", 1000, "batch_size"), ("bogus", 1, "not a known field"),
])
def test_bad_fields_give_one_clear_message(field, value, needle):
    with pytest.raises(UserError) as e:
        parse_request(Txt2ImgRequest, {field: value})
    message = str(e.value)
    assert needle in message
    assert "Traceback" not in message and "\n" not in message


def test_sampler_names_are_forgiving_about_case():
    r = parse_request(Txt2ImgRequest, {"sampler": "dpm++ 2m  karras"})
    assert (r.sampler, r.schedule) == ("DPM++ 2M", "Karras")


def test_seed_minus_one_resolves_to_a_concrete_seed():
    r = Txt2ImgRequest(seed=-1).with_seed()
    assert 0 <= r.seed < 2**32
    assert Txt2ImgRequest(seed=42).with_seed().seed == 42
