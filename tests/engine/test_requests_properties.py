"""Random requests never get anything but a result or one clear validation error."""
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import UserError
from engine.requests import HiresFixRequest, Img2ImgRequest, TiledUpscaleRequest, Txt2ImgRequest, parse_request

ANY = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=30), st.lists(st.integers(), max_size=3))
FIELDS = ["prompt", "negative_prompt", "width", "height", "steps", "guidance", "sampler", "seed", "batch_size",
          "batch_count", "strength", "resize_mode", "factor", "upscaler", "hires_strength", "hires_steps",
          "tile_size", "tile_overlap", "vae_tiling", "bogus"]
requests = st.dictionaries(st.sampled_from(FIELDS), ANY, max_size=8)


@settings(max_examples=300, deadline=None)
@given(requests, st.sampled_from([Txt2ImgRequest, Img2ImgRequest, HiresFixRequest, TiledUpscaleRequest]))
def test_validators_accept_or_explain(data, cls):
    try:
        r = parse_request(cls, data)
    except UserError as e:
        assert str(e).startswith("Invalid request: ") and "\n" not in str(e)
        return
    for name in ("width", "height", "steps", "guidance", "strength", "factor"):
        value = getattr(r, name, None)
        if isinstance(value, float):
            assert math.isfinite(value)
    assert r.seed == -1 or 0 <= r.seed < 2**32


small = st.fixed_dictionaries({
    "prompt": st.text(max_size=300),  # longer than 75 tokens is encoded in chunks; brackets parse as emphasis
    "width": st.integers(-8, 200), "height": st.integers(-8, 200), "steps": st.integers(-1, 4),
    "guidance": st.one_of(st.floats(-1, 31), st.just(math.nan)), "seed": st.integers(-3, 2**33),
    "sampler": st.sampled_from(["Euler", "LCM", "UniPC", "nope", "euler A"]), "batch_size": st.integers(0, 2),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(small)
def test_engine_returns_a_result_or_a_clear_error(tiny_engine, data):
    try:
        result = tiny_engine.txt2img(data)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert len(result.images) == data["batch_size"]
    assert result.images[0].size == (result.parameters["width"], result.parameters["height"])
