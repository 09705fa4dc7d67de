"""Warm-up covers what the tasks will really run (guidance, VAE slicing, encoder, hires and tile sizes)."""
import pytest

from engine import UserError
from engine.options import Optimizations
from engine.runtimes.base import WarmupShape
from engine.runtimes.warmup import warmup_shapes


class Model:  # what warmup_shapes reads of a loaded model
    vae_scale_factor = 8
    is_inpainting = False

    def __init__(self, **options):
        self.options = Optimizations(**options)


def test_without_guidance_the_unet_is_warmed_at_batch_one():
    cfg, = warmup_shapes(Model(), [(256, 256)], guidance=7.0)
    no_cfg, = warmup_shapes(Model(), [(256, 256)], guidance=1.0)
    assert (cfg.unet_batch, no_cfg.unet_batch) == (2, 1)


def test_vae_slicing_decides_the_decoder_batch():
    sliced, = warmup_shapes(Model(vae_slicing=True), [(256, 256)], batch=3)
    whole, = warmup_shapes(Model(vae_slicing=False), [(256, 256)], batch=3)
    assert (sliced.decode_batch, whole.decode_batch) == (1, 3) and sliced.unet_batch == 6


def test_each_task_adds_the_shapes_it_runs():
    shapes = warmup_shapes(Model(), [(252, 256)], tasks=("txt2img", "img2img", "hires_fix"))
    assert shapes == [
        WarmupShape(256, 256, 1, True, 1, False),  # txt2img and the hires base pass (252 snapped to 256)
        WarmupShape(256, 256, 1, True, 1, True),  # img2img also encodes
        WarmupShape(512, 512, 1, True, 1, True),  # hires fix's second pass at 2x (encodes with Lanczos)
    ]


def test_tiled_upscale_warms_its_tile_at_the_tile_batch():
    # a 384x384 input upscaled 2x is 768x768: four 512 px tiles, denoised four at a time
    assert warmup_shapes(Model(), [(384, 384)], guidance=1.0, tasks=("tiled_upscale",)) == [
        WarmupShape(512, 512, 4, False, 1, True)]


def test_unknown_task_is_a_clear_error():
    with pytest.raises(UserError, match="Unknown task"):
        warmup_shapes(Model(), [(256, 256)], tasks=("outpaint",))


def test_inpaint_warms_the_encoder_and_an_inpainting_model_encodes_for_every_task():
    assert warmup_shapes(Model(), [(256, 256)], tasks=("inpaint",)) == [WarmupShape(256, 256, 1, True, 1, True)]
    model = Model()
    model.is_inpainting = True  # its grey conditioning picture is encoded even for txt2img
    assert warmup_shapes(model, [(256, 256)], tasks=("txt2img",)) == [WarmupShape(256, 256, 1, True, 1, True)]
