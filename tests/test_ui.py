"""The UI through gradio_client, against a real app process on a free localhost port."""
import pytest
from gradio_client import Client
from PIL import Image

from appserver import running_app


@pytest.fixture(scope="module")
def client():
    with running_app("--model", "builtin:tiny") as (url, _proc):
        yield Client(url, verbose=False)


def txt2img(client, **kw):
    args = {"prompt_v": "a red circle", "negative_v": "", "width_v": 256, "height_v": 256, "steps_v": 10,
            "guidance_v": 7.0, "sampler_v": "Euler", "seed_v": 5, "batch_v": 1}
    args.update(kw)
    return client.predict(*args.values(), api_name="/txt2img")


def test_txt2img_returns_image_of_requested_size_and_readout(client):
    gallery, readout, params = txt2img(client, width_v=256, height_v=192)
    assert len(gallery) == 1
    with Image.open(gallery[0]["image"]) as im:
        assert im.size == (256, 192)
    assert gallery[0]["caption"] == "seed 5"
    for needle in ("Total", "Text encoding", "Denoising", "Vae decode", "it/s", "Peak RAM", "GiB", "Peak VRAM",
                   "n/a", "pytorch", "Precision"):
        assert needle in readout, needle
    assert params["seed"] == 5 and params["width"] == 256 and params["height"] == 192


def test_batch_of_two_gets_two_seeds(client):
    gallery, readout, params = txt2img(client, batch_v=2, seed_v=40, steps_v=3, width_v=128, height_v=128)
    assert [g["caption"] for g in gallery] == ["seed 40", "seed 41"]


def test_bad_input_is_one_clear_message_and_app_keeps_working(client):
    with pytest.raises(Exception) as e:
        txt2img(client, sampler_v="Euler", steps_v=10, width_v=0)
    assert "64" in str(e.value)
    with pytest.raises(Exception) as e:
        client.predict("/etc/passwd", api_name="/load_model")
    assert "absolute" in str(e.value) or "models folder" in str(e.value)
    with pytest.raises(Exception) as e:
        client.predict("someone/not-here", api_name="/load_model")
    assert "hub" in str(e.value)
    gallery, _, _ = txt2img(client, steps_v=3, width_v=128, height_v=128)
    assert len(gallery) == 1


def test_engine_tab_reports_runtime(client):
    info, message = client.predict("pytorch", api_name="/set_runtime")
    assert "pytorch" in info and "cpu" in info and "pytorch" in message
