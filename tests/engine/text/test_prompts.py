"""Prompts as A1111 users write them: emphasis, BREAK, prompts over 75 tokens, on PyTorch and OpenVINO."""
import numpy as np
import pytest
import torch

from engine import Engine
from engine.models.loading import load_model
from engine.options import Optimizations
from engine.tasks.common import encode_prompt
from engine.text.prompts import CHUNK, parse_weights, tokenize
from engine.text.vocab import WORDS

LONG = " ".join(WORDS[i % len(WORDS)] for i in range(150))  # one token per word in the project's vocabulary
FIRST = " ".join(LONG.split()[:CHUNK])
REQ = {"negative_prompt": "blurry", "width": 64, "height": 64, "steps": 2, "seed": 5, "sampler": "Euler"}


def embeds(engine, prompt, negative="", guidance=7.0):
    with engine.runtime.inference_context():
        return encode_prompt(engine.model, prompt, negative, 1, guidance, engine.runtime.device).kwargs


@pytest.fixture(scope="module")
def ov_engine(tmp_path_factory, ov_tiny):
    cache = ov_tiny.copy(tmp_path_factory.mktemp("ov-prompts") / "cache")  # converted once (conftest)
    engine = Engine(runtime="openvino", cache_dir=cache, outputs_dir=None,
                    optimizations=Optimizations(precision="fp32"))  # as tiny_engine, to compare the two
    engine.load("builtin:tiny")
    return engine


def test_emphasis_syntax_parses_as_a1111_documents():
    def pairs(text):
        return [(f.text, round(f.weight, 4)) for f in parse_weights(text)]

    assert pairs("a (red:1.5) circle") == [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]
    assert pairs("(red) ((blue)) [green]") == [("red", 1.1), (" ", 1.0), ("blue", 1.21), (" ", 1.0),
                                                ("green", round(1 / 1.1, 4))]
    assert pairs("((red:2))") == [("red", 2.2)]  # an outer () multiplies the inner weight
    assert pairs(r"a \(literal\) bracket") == [("a (literal) bracket", 1.0)]
    assert pairs("one BREAK two") == [("one", 1.0), ("", -1.0), ("two", 1.0)]
    assert pairs("(unclosed") == [("unclosed", 1.1)]


def test_long_prompts_are_split_in_chunks_of_75_and_break_starts_a_new_one(tiny_engine):
    tok = tiny_engine.model.pipe.tokenizer
    long = tokenize(tok, LONG)
    assert long.count == 150 and [len(c) for c in long.tokens] == [75, 75]
    assert [len(c) for c in tokenize(tok, "a red circle BREAK on a blue background").tokens] == [3, 4]
    assert embeds(tiny_engine, LONG)["prompt_embeds"].shape[1] == 2 * 77


def test_short_prompts_encode_exactly_as_diffusers_does():
    for name in ("builtin:tiny", "builtin:tiny-sdxl"):
        model = load_model(name)
        ours = encode_prompt(model, "a red circle on a blue background", "blurry", 2, 7.0, "cpu").kwargs
        if model.is_sdxl:
            pe, npe, ppe, nppe = model.pipe.encode_prompt(prompt="a red circle on a blue background", device="cpu",
                                                          num_images_per_prompt=2, do_classifier_free_guidance=True,
                                                          negative_prompt="blurry")
            ref = dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                       negative_pooled_prompt_embeds=nppe)
        else:
            pe, npe = model.pipe.encode_prompt("a red circle on a blue background", "cpu", 2, True,
                                               negative_prompt="blurry")
            ref = dict(prompt_embeds=pe, negative_prompt_embeds=npe)
        assert set(ours) == set(ref), name
        for key in ref:
            assert torch.equal(ours[key], ref[key]), (name, key)


def test_weight_scales_that_tokens_vector_and_keeps_the_mean(tiny_engine, monkeypatch):
    """(red:1.5): red's output vector is x1.5 relative to every other token's, and the chunk is rescaled so its
    mean is the unweighted one (A1111's method)."""
    tok = tiny_engine.model.pipe.tokenizer
    assert tokenize(tok, "a (red:1.5) circle").tokens == tokenize(tok, "a red circle").tokens
    # builtin:tiny's final LayerNorm has no bias, so its outputs have a mean of ~0 and nothing to restore; a real
    # CLIP's has one. Give it one for this test.
    bias = tiny_engine.model.pipe.text_encoder.get_submodule("final_layer_norm").bias
    monkeypatch.setattr(bias, "data", torch.full_like(bias, 0.3))
    plain = embeds(tiny_engine, "a red circle", guidance=1.0)["prompt_embeds"][0].double()
    weighted = embeds(tiny_engine, "a (red:1.5) circle", guidance=1.0)["prompt_embeds"][0].double()
    ratio = weighted / plain  # per token: c, and 1.5 c at "red" (BOS, a, red, ...)
    c = ratio[0].mean()
    assert torch.allclose(ratio[2], 1.5 * c, rtol=1e-4)
    others = torch.cat([ratio[:2], ratio[3:]])
    assert torch.allclose(others, c.expand_as(others), rtol=1e-4)
    assert abs(c - 1) > 1e-3  # the mean correction really acted
    assert torch.isclose(weighted.mean(), plain.mean(), rtol=1e-5)


def test_weighting_a_chunk_whose_mean_is_zero_scales_and_never_gives_nan():
    """A final LayerNorm without bias gives outputs of mean ~0: on some CPUs exactly 0 after the weighting, and the
    mean-restoring ratio was 0/0 = NaN (seen on a Zen 4). There is no mean to keep; the weights still apply."""
    from engine.text.prompts import _apply_weights

    z = torch.randn(1, CHUNK + 2, 8)
    z = z - z.mean()  # mean exactly 0 before, ~0 after
    weights = [1.0, 1.5] + [1.0] * (CHUNK - 2)
    out = _apply_weights(z, weights)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, 2], 1.5 * z[0, 2]) and torch.allclose(out[0, 1], z[0, 1])
    biased = z + 0.3  # a real mean: restored as A1111 does
    assert torch.isclose(_apply_weights(biased, weights).mean(), biased.mean(), rtol=1e-5)


def test_sdxl_long_prompt_uses_both_encoders_in_chunks():
    model = load_model("builtin:tiny-sdxl")
    out = encode_prompt(model, LONG, "", 1, 7.0, "cpu").kwargs
    short = encode_prompt(model, FIRST, "", 1, 7.0, "cpu").kwargs
    width = model.pipe.text_encoder.config.hidden_size + model.pipe.text_encoder_2.config.hidden_size
    assert out["prompt_embeds"].shape == (1, 154, width)
    assert out["negative_prompt_embeds"].shape == (1, 154, width)  # padded to the prompt's chunks
    assert torch.allclose(out["prompt_embeds"][:, :77], short["prompt_embeds"], atol=1e-6)
    assert torch.equal(out["pooled_prompt_embeds"], short["pooled_prompt_embeds"])  # the first chunk's


def test_150_tokens_differ_from_the_first_75_and_runtimes_agree(tiny_engine, ov_engine, monkeypatch):
    calls = []
    infer = ov_engine.runtime.infer
    monkeypatch.setattr(ov_engine.runtime, "infer", lambda part, inputs: (
        calls.append((part, inputs["input_ids"].shape)) if part == "text_encoder" else None, infer(part, inputs))[1])
    results = {}
    for name, engine in (("pytorch", tiny_engine), ("openvino", ov_engine)):
        long, first = embeds(engine, LONG, "blurry"), embeds(engine, FIRST, "blurry")
        pe, pe75 = long["prompt_embeds"], first["prompt_embeds"]
        assert pe.shape[1] == 154 and pe75.shape[1] == 77
        assert torch.allclose(pe[:, :77], pe75, atol=1e-4), name  # chunk 1 is the first 75 tokens
        empty = embeds(engine, "", "blurry")["prompt_embeds"]
        assert (pe[:, 77:] - empty).abs().max() > 1e-2, name  # chunk 2 carries the other 75
        results[name] = (pe, long["negative_prompt_embeds"],
                         engine.txt2img({**REQ, "prompt": LONG}), engine.txt2img({**REQ, "prompt": FIRST}))
    # OpenVINO's text encoder ran at its static 77 tokens, once per chunk (2 + 2 for the padded negative).
    assert calls and {shape for _, shape in calls} == {(1, 77)}
    (pt_pe, pt_npe, pt_long, pt_first), (ov_pe, ov_npe, ov_long, ov_first) = results["pytorch"], results["openvino"]
    assert torch.allclose(pt_pe, ov_pe, atol=1e-4) and torch.allclose(pt_npe, ov_npe, atol=1e-4)
    for long, first in ((pt_long, pt_first), (ov_long, ov_first)):
        assert np.abs(np.asarray(long.images[0], np.int16) - np.asarray(first.images[0], np.int16)).max() > 0
        assert any("150 tokens: encoded as 2 chunks" in n for n in long.notices)
    diff = np.abs(np.asarray(pt_long.images[0], np.int16) - np.asarray(ov_long.images[0], np.int16))
    assert diff.max() <= 3 and diff.mean() < 0.1  # the tolerance test_openvino states for the same graph


def test_prompt_cache_keeps_long_prompts_whole(tiny_engine):
    assert tiny_engine.model.options.prompt_cache  # on by default
    tiny_engine.model.prompt_cache.clear()
    first = tiny_engine.txt2img({**REQ, "prompt": LONG})
    again = tiny_engine.txt2img({**REQ, "prompt": LONG})
    other = tiny_engine.txt2img({**REQ, "prompt": LONG + " red"})
    assert first.readout.details["prompt_cache"] == "miss" and again.readout.details["prompt_cache"] == "hit"
    assert other.readout.details["prompt_cache"] == "miss"  # a change in chunk 2 is a different key
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
