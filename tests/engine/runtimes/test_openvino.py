"""OpenVINO runtime on builtin:tiny: parity with PyTorch, shape cache, disk cache, corrupt entries."""
import sys

import numpy as np
import pytest
from pictures import pixels

from engine import Engine
from engine.options import Optimizations

REQ = {"prompt": "a red circle on a blue background", "negative_prompt": "blurry", "width": 128, "height": 128,
       "steps": 6, "seed": 4, "sampler": "Euler"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, ov_tiny):
    # builtin:tiny already converted (conftest): tests here mutate the folder, so a copy of their own
    return ov_tiny.copy(tmp_path_factory.mktemp("ov") / "cache")


@pytest.fixture(scope="module")
def ov_engine(cache_dir):
    # fp32 as tiny_engine, whatever this CPU would pick, so the two are compared like for like
    engine = Engine(runtime="openvino", cache_dir=cache_dir, optimizations=Optimizations(precision="fp32"))
    engine.load("builtin:tiny")
    return engine


def test_matches_pytorch_for_the_same_seed(tiny_engine, ov_engine):
    ref = pixels(tiny_engine.txt2img(REQ))
    got = pixels(ov_engine.txt2img(REQ))
    diff = np.abs(ref - got)
    # Same graph, different kernels: pixels may differ by rounding, stated tolerance 3/255 max, 0.1 mean.
    assert diff.max() <= 3 and diff.mean() < 0.1


def test_components_are_openvino_and_torch_copies_are_gone(ov_engine):
    pipe = ov_engine.model.pipe
    for name in ("unet", "vae", "text_encoder"):
        assert type(getattr(pipe, name)).__module__.startswith("engine.runtimes.openvino")


def test_shape_change_compiles_once_then_hits(ov_engine):
    first = ov_engine.txt2img({**REQ, "width": 96, "height": 160})
    assert first.readout.shape_cache.startswith("compiled now")
    again = ov_engine.txt2img({**REQ, "width": 96, "height": 160, "seed": 9})
    assert again.readout.shape_cache == "warm (cache hit)"
    assert again.images[0].size == (96, 160)


def test_warmed_resolutions_alternate_without_recompiling(ov_engine):
    results = ov_engine.warmup([(128, 64), (64, 128)])
    assert [r.compiled for r in results] == [True, True]
    assert [r.compiled for r in ov_engine.warmup([(128, 64)])] == [False]
    compiles = len(ov_engine.runtime.compile_events)
    for w, h in [(128, 64), (64, 128), (128, 64), (64, 128)]:
        assert ov_engine.txt2img({**REQ, "width": w, "height": h}).readout.shape_cache == "warm (cache hit)"
    assert len(ov_engine.runtime.compile_events) == compiles


def test_warmup_compiles_what_an_img2img_job_runs(ov_engine):
    from PIL import Image

    from engine.runtimes.base import WarmupShape

    # guidance 1.0: the UNet at batch 1; img2img: the VAE encoder at one 128x128 image
    shape = WarmupShape(128, 128, batch=1, guidance=False, decode_batch=1, encode=True)
    runtime = ov_engine.runtime
    [result] = runtime.warmup(ov_engine.model, [shape])
    assert result.compiled and result.state == "compiled"
    compiled = {part for part, _ in runtime._compiled}
    assert {"unet", "vae_decoder", "vae_encoder", "text_encoder"} <= compiled
    compiles = len(runtime.compile_events)
    init = Image.new("RGB", (128, 128), (200, 40, 40))
    r = ov_engine.img2img({**REQ, "guidance": 1.0, "strength": 0.5}, init)
    assert r.images[0].size == (128, 128)
    assert runtime.compile_events[compiles:] == [] and r.readout.shape_cache == "warm (cache hit)"
    assert runtime.warmup(ov_engine.model, [shape])[0].state == "already warm"


def test_second_start_reuses_the_disk_cache(ov_tiny):
    engine = Engine(runtime="openvino", cache_dir=ov_tiny.folder)
    model = engine.load("builtin:tiny")
    assert engine.runtime.conversions == []
    assert {"unet", "vae", "text_encoder"} <= model.skeleton  # no PyTorch weights were built for them
    # the same pixels as the start that converted
    assert np.array_equal(pixels(engine.txt2img(REQ)), pixels(ov_tiny.engine.txt2img(REQ)))


def _replace(path, data: bytes):
    # A new file in place of the old (as a crash or another program would leave it); the live
    # engine keeps its own mapping of the old file.
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def test_corrupt_cache_entry_is_rebuilt(ov_engine, cache_dir):
    reference = pixels(ov_engine.txt2img(REQ))
    runtime = ov_engine.runtime
    folder = runtime.ir_cache.folder(ov_engine.model.identity, runtime.variant)
    binf = folder / "unet.bin"
    data = bytearray(binf.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)  # zero the first half, same size
    _replace(binf, bytes(data))
    _replace(folder / "vae_decoder.xml", b"<not xml")
    engine = Engine(runtime="openvino", cache_dir=cache_dir, optimizations=Optimizations(precision="fp32"))
    model = engine.load("builtin:tiny")
    rebuilt = {part for part, _ in engine.runtime.conversions}
    assert {"unet", "vae_decoder"} <= rebuilt and "text_encoder" not in rebuilt
    assert "unet" not in model.skeleton
    assert np.array_equal(pixels(engine.txt2img(REQ)), reference)


def test_int8_weights_run_and_say_so(cache_dir, ov_engine):
    engine = Engine(runtime="openvino", cache_dir=cache_dir, optimizations=Optimizations(int8_weights=True))
    engine.load("builtin:tiny")
    r = engine.txt2img(REQ)
    assert "int8" in r.readout.precision
    assert engine.runtime.variant.endswith("int8")
    diff = np.abs(pixels(r) - pixels(ov_engine.txt2img(REQ)))
    assert diff.mean() < 20  # compressed weights move the output a little, not into different noise


def test_int8_convolutions_quantize_once_and_come_back_from_the_cache(tmp_path, ov_engine, ov_tiny_int8h_deepcache):
    # The -int8h text encoder and VAE come from a copied cache (its UNet graphs are DeepCache's, not "unet"):
    # only the UNet is quantized here, calibrated through the cached text encoder.
    cache = ov_tiny_int8h_deepcache.copy(tmp_path / "cache")
    engine = Engine(runtime="openvino", cache_dir=cache, optimizations=Optimizations(int8_convolutions=True))
    engine.load("builtin:tiny")
    assert [part for part, _ in engine.runtime.conversions] == ["unet"]
    assert engine.runtime.variant.endswith("int8h")
    r = engine.txt2img(REQ)
    assert "int8 convolutions" in r.readout.precision
    xml = next(cache.rglob("*-int8h/unet.xml")).read_text()
    assert "FakeQuantize" in xml  # activations are quantized, not only weights
    diff = np.abs(pixels(r) - pixels(ov_engine.txt2img(REQ)))
    assert diff.mean() < 25  # quantized activations move the picture, not into different noise
    again = Engine(runtime="openvino", cache_dir=cache, optimizations=Optimizations(int8_convolutions=True))
    again.load("builtin:tiny")
    assert not again.runtime.conversions  # nothing converted or calibrated again
    assert np.array_equal(pixels(again.txt2img(REQ)), pixels(r))


def test_sdxl_runs_on_openvino(ov_tiny_sdxl, tmp_path):
    fp32 = Optimizations(precision="fp32")
    pt = Engine(runtime="pytorch", optimizations=fp32)
    pt.load("builtin:tiny-sdxl")
    ov = Engine(runtime="openvino", cache_dir=ov_tiny_sdxl.copy(tmp_path / "cache"),  # converted once (conftest)
                optimizations=fp32)
    ov.load("builtin:tiny-sdxl")
    diff = np.abs(pixels(pt.txt2img(REQ)) - pixels(ov.txt2img(REQ)))
    assert diff.max() <= 3


def test_int8_convolutions_on_sdxl_fall_back_to_int8_weights_and_say_so(tmp_path):
    # SDXL's UNet takes pooled text and size inputs the calibration does not make; it gets int8 weights only.
    engine = Engine(runtime="openvino", cache_dir=tmp_path, optimizations=Optimizations(int8_convolutions=True))
    engine.load("builtin:tiny-sdxl")
    precision = engine.txt2img({**REQ, "steps": 2}).readout.precision
    assert "int8 weights" in precision and "convolutions" not in precision


def test_unwritable_cache_still_serves(tmp_path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")  # a cache path under a regular file can never be created
    engine = Engine(runtime="openvino", cache_dir=blocker / "cache")
    engine.load("builtin:tiny")
    assert engine.txt2img({**REQ, "steps": 2}).images


def test_lru_keeps_at_most_max_shapes_per_part(cache_dir):
    engine = Engine(runtime="openvino", cache_dir=cache_dir)
    engine.load("builtin:tiny")
    engine.runtime.max_shapes = 2
    for w in (64, 72, 80):
        engine.txt2img({**REQ, "width": w, "height": 64, "steps": 1})
    unet_keys = [k for k in engine.runtime._compiled if k[0] == "unet"]
    assert len(unet_keys) == 2
    assert engine.txt2img({**REQ, "width": 64, "height": 64, "steps": 1}).readout.shape_cache.startswith("compiled")
    assert engine.txt2img({**REQ, "width": 80, "height": 64, "steps": 1}).readout.shape_cache == "warm (cache hit)"
    assert engine.txt2img({**REQ, "width": 72, "height": 64, "steps": 1}).readout.shape_cache.startswith("compiled")


def test_compiles_make_room_when_memory_is_short(cache_dir, monkeypatch):
    import psutil

    engine = Engine(runtime="openvino", cache_dir=cache_dir)
    engine.load("builtin:tiny")
    engine.txt2img({**REQ, "steps": 1})
    assert engine.runtime._cost["unet"] > 0
    real = psutil.virtual_memory()
    # enough for the job itself (the engine's own guard), less than a compile plus the reserve
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=100 << 20))
    r = engine.txt2img({**REQ, "width": 96, "steps": 1})  # every older shape is dropped first
    assert r.images and all(k[1] != (("encoder_hidden_states", (2, 77, 32)), ("sample", (2, 4, 16, 16)),
                                     ("timestep", (1,))) for k in engine.runtime._compiled)


def test_compiled_blob_cache_is_opt_in(cache_dir, tmp_path):
    plain = Engine(runtime="openvino", cache_dir=cache_dir)
    assert "CACHE_DIR" not in plain.runtime._config()
    blobs = Engine(runtime="openvino", cache_dir=tmp_path, optimizations=Optimizations(compiled_blob_cache=True))
    assert blobs.runtime._config()["CACHE_DIR"].startswith(str(tmp_path))


def test_readout_names_the_precision_the_compiled_model_reports():
    # The compiled model reports an ov.Type; str() of bf16 is "<Type: 'bfloat16'>", which once read as fp32.
    import openvino as ov

    from engine.runtimes.openvino import precision_name

    assert [precision_name(t) for t in (ov.Type.bf16, ov.Type.f16, ov.Type.f32)] == ["bf16", "fp16", "fp32"]


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def _resident_bytes_under(folder) -> int:
    """Resident bytes of this process's mappings of files under `folder` (from /proc/self/smaps)."""
    total, inside = 0, False
    prefix = str(folder.resolve())
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5].startswith(prefix)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_dropping_mapped_pages_keeps_the_data_and_spares_writable_mappings(tmp_path):
    import mmap

    from engine.runtimes.openvino import drop_mapped_pages

    data = np.random.default_rng(0).integers(0, 256, 32 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "weights.bin").write_bytes(data)
    (tmp_path / "copy.bin").write_bytes(data[:1 << 20])
    with open(tmp_path / "weights.bin", "rb") as f:
        read_only = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with open(tmp_path / "copy.bin", "r+b") as f:
        private = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable: a change lives only in memory
    private[0] = (data[0] + 1) % 256
    assert read_only[:] == data  # every page resident
    before = _rss_file_bytes()
    assert drop_mapped_pages(tmp_path) == len(data)  # the read-only mapping only
    assert before - _rss_file_bytes() > (24 << 20)
    assert read_only[:] == data  # pages fault back in from the file
    assert private[0] == (data[0] + 1) % 256  # the private change survives
    read_only.close()
    private.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_compiled_parts_do_not_keep_the_ir_resident(tiny_ov_cache):
    engine = Engine(runtime="openvino", cache_dir=tiny_ov_cache)
    engine.load("builtin:tiny")  # from the cache: the IR is mapped from its files as after a conversion
    first = pixels(engine.txt2img(REQ))
    ir_bytes = sum(p.stat().st_size for p in (tiny_ov_cache / "ir").rglob("*.bin"))
    resident = _resident_bytes_under(tiny_ov_cache / "ir")
    assert ir_bytes > 0 and resident < ir_bytes * 0.5, (resident, ir_bytes)  # measured 17%; 91% without the drop
    assert np.array_equal(pixels(engine.txt2img(REQ)), first)


def test_a_load_that_fails_leaves_the_previous_model_working(tiny_ov_cache, monkeypatch):
    from engine.errors import RuntimeUnavailable
    from engine.runtimes.openvino import loader

    engine = Engine(runtime="openvino", cache_dir=tiny_ov_cache)  # tiny cached; tiny-sdxl is not
    engine.load("builtin:tiny")
    before = pixels(engine.txt2img(REQ))
    real_convert = loader.convert_part

    def fail_at_the_vae(part, component):  # after the new UNet converted
        if part == "vae_decoder":
            raise RuntimeUnavailable("injected: the VAE does not convert")
        return real_convert(part, component)

    monkeypatch.setattr(loader, "convert_part", fail_at_the_vae)
    with pytest.raises(RuntimeUnavailable, match="injected"):
        engine.load("builtin:tiny-sdxl")
    assert [part for part, _ in engine.runtime.conversions] == ["unet"]
    assert engine.model.name == "builtin:tiny" and engine.runtime.name == "openvino"
    assert np.array_equal(pixels(engine.txt2img(REQ)), before)
    assert engine.txt2img({**REQ, "width": 96, "steps": 1}).images  # a new shape compiles from the old IR


def test_warmup_for_the_fastest_preset_and_img2img_means_no_compile_at_the_first_jobs(tiny_ov_cache):
    """Warm-up used to assume guidance (UNet batch 2) and txt2img only: an LCM job (guidance 1) or an
    img2img job (VAE encoder) at a warmed size compiled again."""
    from PIL import Image

    engine = Engine(runtime="openvino", cache_dir=tiny_ov_cache)
    engine.load("builtin:tiny")
    results = engine.warmup([(96, 96)], guidance=1.0, tasks=("txt2img", "img2img"))
    assert [r.state for r in results] == ["compiled", "compiled"]
    compiles = len(engine.runtime.compile_events)
    fast = {**REQ, "width": 96, "height": 96, "guidance": 1.0, "sampler": "LCM", "steps": 2}
    assert engine.txt2img(fast).readout.shape_cache == "warm (cache hit)"
    image = Image.new("RGB", (96, 96), (200, 30, 30))
    assert engine.img2img({**fast, "strength": 0.5}, image).readout.shape_cache == "warm (cache hit)"
    assert len(engine.runtime.compile_events) == compiles
