"""Textual-inversion embeddings: files in <models-dir>/embeddings, loaded or skipped with a reason; a name acts
only where it is written, as its n vectors (n tokens for chunking, weighted like words), on PyTorch and OpenVINO."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine import Engine
from engine.options import Optimizations
from engine.tasks.common import encode_prompt
from engine.text import embeddings as text_embeddings
from engine.text.prompts import CHUNK, tokenize
from engine.text.vocab import WORDS

WIDTH = 32  # builtin:tiny's text encoder
REQ = {"prompt": "a red circle", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 3, "seed": 5,
       "sampler": "Euler"}


class Odd:  # a .pt holding this needs pickle to load
    pass


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, width), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    folder = root / "embeddings"
    (folder / "sub").mkdir(parents=True)
    save_file({"emb_params": vectors(2)}, str(folder / "myemb.safetensors"))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors(3, seed=1))},
                "name": "ptemb", "step": 100, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "tiny"},
               folder / "ptemb.pt")
    torch.save({"<diff-emb>": vectors(1, seed=2)[0]}, folder / "sub" / "diffemb.bin")  # diffusers' layout
    save_file({"emb_params": vectors(1, 768)}, str(folder / "wide.safetensors"))  # SD 1.x width
    torch.save({"string_to_param": {"*": Odd()}}, folder / "pickled.pt")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    outside = root / "outside.safetensors"
    save_file({"emb_params": vectors(1)}, str(outside))
    os.symlink(outside, folder / "escape.safetensors")
    save_file({"emb_params": vectors(1)}, str(root / "model-looking.safetensors"))  # a "model" beside it
    return root


@pytest.fixture(scope="module")
def engine(models_dir):
    engine = Engine(runtime="pytorch", models_dir=models_dir, outputs_dir=None,
                    optimizations=Optimizations(precision="fp32", prompt_cache=False))
    engine.load("builtin:tiny")
    engine.preview_every = 0
    return engine


def embeds(engine, prompt, negative="", guidance=7.0):
    with engine.runtime.inference_context():
        return encode_prompt(engine.model, prompt, negative, 1, guidance, engine.runtime.device).kwargs


def test_files_are_listed_as_loaded_or_skipped_with_a_reason(engine):
    got = engine.embeddings(reasons=True)
    assert set(got["loaded"]) == {"myemb", "ptemb", "diffemb"}
    assert got["loaded"]["myemb"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                      "shape": WIDTH, "vectors": 2}
    assert got["loaded"]["ptemb"] == {"step": 100, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "tiny",
                                      "shape": WIDTH, "vectors": 3}
    assert got["loaded"]["diffemb"]["vectors"] == 1
    skipped = got["skipped"]
    assert set(skipped) == {"wide", "pickled", "broken", "escape"}
    assert skipped["wide"]["shape"] == 768 and "takes 32" in skipped["wide"]["reason"]
    assert "pickle" in skipped["pickled"]["reason"]
    assert "safetensors" in skipped["broken"]["reason"]
    assert "outside" in skipped["escape"]["reason"]
    plain = engine.embeddings()  # A1111's keys only
    assert set(plain["skipped"]["wide"]) == {"step", "sd_checkpoint", "sd_checkpoint_name", "shape", "vectors"}
    assert engine.embedding_names() == ["myemb", "ptemb", "diffemb"]
    assert not any("embeddings" in name for name in engine.model_names())  # not offered as models


def test_the_name_acts_only_where_written_and_as_its_own_vectors(engine, tiny_engine):
    table = engine.model.pipe.text_encoder.get_input_embeddings().weight
    vocab = engine.model.pipe.text_encoder.config.vocab_size
    words = engine.model.embeddings.words["text_encoder"]
    start = words.ids["myemb"][0]
    assert start >= vocab and words.ids["myemb"] == (start, start + 1)
    assert torch.equal(table[start:start + 2], vectors(2))  # the file's vectors are the name's token rows
    assert torch.equal(table[:vocab], tiny_engine.model.pipe.text_encoder.get_input_embeddings().weight)

    base = embeds(engine, "a photo of")["prompt_embeds"]
    with_name = embeds(engine, "a photo of myemb")["prompt_embeds"]
    n = len(tokenize(engine.model.pipe.tokenizer, "a photo of").tokens[0])  # the name's vectors start at 1 + n
    assert torch.equal(with_name[:, :1 + n], base[:, :1 + n])  # causal attention: what comes before is unchanged
    assert (with_name[:, 1 + n:1 + n + 2] - base[:, 1 + n:1 + n + 2]).abs().amax(-1).min() > 1e-3
    assert (with_name[:, 1 + n + 2] - base[:, 1 + n + 2]).abs().max() > 1e-3  # and after it
    # Bit-identical to a model with no embeddings at all where no name is written, or only inside other words.
    for prompt in ("a photo of", "xmyembx", "a xmyemb b", "myembx", "my-myemb", "ptemb_2"):
        for key, value in embeds(engine, prompt, "blurry").items():
            assert torch.equal(value, embeds(tiny_engine, prompt, "blurry")[key]), (prompt, key)
    assert not torch.equal(embeds(engine, "x", "myemb")["negative_prompt_embeds"],
                           embeds(tiny_engine, "x", "myemb")["negative_prompt_embeds"])
    assert torch.equal(embeds(engine, "a photo of MyEmb")["prompt_embeds"], with_name)  # any case, as A1111
    assert torch.equal(embeds(engine, "a photo of myemb, red")["prompt_embeds"][:, :1 + n + 2],
                       with_name[:, :1 + n + 2])


def test_emphasis_weights_the_vectors_and_a_multi_vector_name_counts_as_n_tokens(engine):
    tok, words = engine.model.pipe.tokenizer, engine.model.embeddings.words["text_encoder"]
    chunks = tokenize(tok, "a (ptemb:1.5) b", words)
    ids = words.ids["ptemb"]
    assert chunks.count == 5 and chunks.tokens[0][1:4] == list(ids) and chunks.weights[0][1:4] == [1.5] * 3
    weighted, plain = embeds(engine, "a (ptemb:1.5) b"), embeds(engine, "a ptemb b")
    assert not torch.equal(weighted["prompt_embeds"], plain["prompt_embeds"])
    words72 = " ".join(WORDS[:72])  # one token each
    assert [len(c) for c in tokenize(tok, f"{words72} ptemb", words).tokens] == [75]
    assert tokenize(tok, f"{words72} ptemb", words).count == 75
    # 74 + 3 does not fit in 75: the embedding starts the next chunk whole, as A1111 does
    words74 = " ".join(WORDS[:74])
    long = tokenize(tok, f"{words74} ptemb", words)
    assert [len(c) for c in long.tokens] == [74, 3] and long.tokens[1] == list(ids)
    assert embeds(engine, f"{words74} ptemb")["prompt_embeds"].shape[1] == 2 * (CHUNK + 2)
    assert embeds(engine, f"{words74} x")["prompt_embeds"].shape[1] == CHUNK + 2


def test_sdxl_embeddings_fill_both_encoders(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"clip_l": vectors(2, seed=3), "clip_g": vectors(2, seed=4)}, str(folder / "xlemb.safetensors"))
    save_file({"emb_params": vectors(2)}, str(folder / "oneemb.safetensors"))
    engine = Engine(runtime="pytorch", models_dir=tmp_path, outputs_dir=None,
                    optimizations=Optimizations(precision="fp32", prompt_cache=False))
    engine.load("builtin:tiny-sdxl")
    got = engine.embeddings(reasons=True)
    assert got["loaded"]["xlemb"]["shape"] == 2 * WIDTH and got["loaded"]["xlemb"]["vectors"] == 2
    assert "another kind of model" in got["skipped"]["oneemb"]["reason"]
    pipe = engine.model.pipe
    for component, seed in (("text_encoder", 3), ("text_encoder_2", 4)):
        start = engine.model.embeddings.words[component].ids["xlemb"][0]
        rows = getattr(pipe, component).get_input_embeddings().weight[start:start + 2]
        assert torch.equal(rows, vectors(2, seed=seed)), component
    base, named = embeds(engine, "a photo of", "blurry"), embeds(engine, "a photo of xlemb", "blurry")
    assert not torch.equal(base["pooled_prompt_embeds"], named["pooled_prompt_embeds"])
    assert torch.equal(base["negative_prompt_embeds"], named["negative_prompt_embeds"])
    result = engine.txt2img({**REQ, "negative_prompt": "xlemb"})
    assert np.isfinite(np.asarray(result.images[0], dtype=np.float32)).all()


def test_a_text_encoder_with_a_lora_fused_takes_the_embedding_too(engine, models_dir):
    from lora_files import known_matrices, save_kohya

    (models_dir / "lora").mkdir(exist_ok=True)
    save_kohya(models_dir / "lora" / "te.safetensors", known_matrices(engine.model.pipe))
    plain = engine.txt2img({**REQ, "prompt": "a red circle myemb"})
    fused = engine.txt2img({**REQ, "prompt": "a red circle myemb <lora:te:1>"})
    assert fused.readout.details["lora"].startswith("te x1")
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(fused.images[0]))
    assert engine.model.embeddings.words["text_encoder"].ids["myemb"]  # still in the table
    engine.txt2img(REQ)  # the LoRA off again for the other tests


def test_a_new_file_is_used_by_the_next_job_and_refresh_rereads(models_dir):
    engine = Engine(runtime="pytorch", models_dir=models_dir, outputs_dir=None,
                    optimizations=Optimizations(precision="fp32", prompt_cache=True))
    engine.load("builtin:tiny")
    engine.preview_every = 0
    request = {**REQ, "prompt": "a red circle lateemb"}
    before = engine.txt2img(request)
    path = models_dir / "embeddings" / "lateemb.safetensors"
    save_file({"emb_params": vectors(2, seed=9)}, str(path))
    try:
        after = engine.txt2img(request)
        assert after.readout.details["embeddings_change"].startswith("4 loaded")
        assert after.readout.details["prompt_cache"] == "miss"  # the set is part of the cache key
        assert not np.array_equal(np.asarray(before.images[0]), np.asarray(after.images[0]))
        assert "lateemb" in engine.embeddings()["loaded"] and "lateemb" in engine.embedding_names()
    finally:
        path.unlink()
    assert "lateemb" not in engine.embedding_names()
    assert "lateemb" not in engine.refresh_embeddings()["loaded"]
    again = engine.txt2img(request)
    assert "embeddings_change" not in again.readout.details  # the refresh did it
    assert np.array_equal(np.asarray(before.images[0]), np.asarray(again.images[0]))


def test_names_and_reading_are_bounded(tmp_path, monkeypatch):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": vectors(CHUNK + 1)}, str(folder / "toolong.safetensors"))
    save_file({"emb_params": vectors(1)}, str(folder / "two words.safetensors"))
    save_file({"emb_params": vectors(1)}, str(folder / "Same.safetensors"))
    (folder / "sub").mkdir()
    save_file({"emb_params": vectors(1)}, str(folder / "sub" / "same.safetensors"))
    save_file({"emb_params": torch.full((1, WIDTH), float("nan"))}, str(folder / "nan.safetensors"))
    save_file({"a": vectors(1), "b": vectors(1)}, str(folder / "twokeys.safetensors"))
    save_file({"emb_params": vectors(1)}, str(folder / ".hidden.safetensors"))
    read = text_embeddings.read_folder(tmp_path)
    assert [f.name for f in read.files] == ["Same"]
    reasons = {name: skip.reason for name, skip in read.skipped.items()}
    assert "76 vectors" in reasons["toolong"] and "one word" in reasons["two words"]
    assert "same name as Same.safetensors" in reasons["sub/same.safetensors"]
    assert "NaN" in reasons["nan"] and "none of" in reasons["twokeys"]
    assert ".hidden" not in reasons
    monkeypatch.setattr(text_embeddings, "MAX_BYTES", 10)
    assert "bytes" in text_embeddings.read_folder(tmp_path).skipped["Same"].reason


@pytest.fixture(scope="module")
def ov_engine(models_dir, tmp_path_factory, ov_tiny):
    cache = ov_tiny.copy(tmp_path_factory.mktemp("ov-emb") / "cache")  # plain parts converted once (conftest)
    engine = Engine(runtime="openvino", models_dir=models_dir, cache_dir=cache, outputs_dir=None,
                    optimizations=Optimizations(precision="fp32", prompt_cache=False))
    engine.load("builtin:tiny")
    engine.preview_every = 0
    return engine


def test_openvino_text_encoder_gets_the_extended_table(engine, ov_engine):
    assert [part for part, _ in ov_engine.runtime.conversions] == ["text_encoder"]  # its identity holds the set
    assert ov_engine.embeddings() == engine.embeddings()
    for prompt in ("a photo of myemb", "a (ptemb:1.3) and diffemb", "a photo of"):
        pt, ov = embeds(engine, prompt, "xmyembx"), embeds(ov_engine, prompt, "xmyembx")
        for key in pt:
            torch.testing.assert_close(ov[key], pt[key], atol=1e-4, rtol=1e-4, msg=f"{prompt}: {key}")
    request = {**REQ, "negative_prompt": "blurry myemb"}
    pt_image = np.asarray(engine.txt2img(request).images[0], dtype=np.float32)
    ov_image = np.asarray(ov_engine.txt2img(request).images[0], dtype=np.float32)
    assert np.isfinite(ov_image).all() and ov_image.std() > 0
    assert np.abs(pt_image - ov_image).mean() < 2.0
    plain = np.asarray(ov_engine.txt2img(REQ).images[0], dtype=np.float32)
    assert np.abs(plain - ov_image).mean() > 0.5  # the embedding did something


def test_openvino_reconverts_only_the_text_encoder_when_the_set_changes(ov_engine, models_dir):
    path = models_dir / "embeddings" / "ovlate.safetensors"
    save_file({"emb_params": vectors(1, seed=11)}, str(path))
    try:
        converted = len(ov_engine.runtime.conversions)
        result = ov_engine.txt2img({**REQ, "prompt": "a red circle ovlate"})
        assert "text encoders prepared" in result.readout.details["embeddings_change"]
        assert [p for p, _ in ov_engine.runtime.conversions[converted:]] == ["text_encoder"]
    finally:
        path.unlink()
    converted = len(ov_engine.runtime.conversions)
    ov_engine.refresh_embeddings()
    assert len(ov_engine.runtime.conversions) == converted  # the earlier set's IR is in the cache
    assert "ovlate" not in ov_engine.embeddings()["loaded"]


def test_old_clip_configs_still_pool_at_the_end_token():
    """CLIP configs from before transformers fixed eos_token_id (2) pool at the largest id: with embeddings past
    the vocabulary that would be the embedding, so the end token is looked up by its id instead."""
    from types import SimpleNamespace

    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.text.prompts import Words, chunk_ids
    from engine.text.vocab import load_tokenizer

    tok = load_tokenizer()
    assert tok.eos_token_id == len(tok) - 1  # as in CLIP's own vocabulary
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, eos_token_id=2, bos_token_id=tok.bos_token_id)
    encoder = CLIPTextModel(config).eval()
    pipe = SimpleNamespace(tokenizer=tok, text_encoder=encoder)
    ids = chunk_ids(tok, tokenize(tok, "a photo of").tokens[0])
    before = encoder(torch.tensor([ids])).pooler_output
    folder = text_embeddings.Folder([text_embeddings.EmbeddingFile("myemb", "d", {"": vectors(2)})])
    text_embeddings.install(pipe, False, text_embeddings.plan(folder, pipe, False))
    assert getattr(encoder, "text_model", encoder).eos_token_id == tok.eos_token_id
    assert torch.equal(encoder(torch.tensor([ids])).pooler_output, before)  # same answer without a name
    words = Words({"myemb": (len(tok), len(tok) + 1)})
    ids = chunk_ids(tok, tokenize(tok, "a photo of myemb", words).tokens[0])
    out = encoder(torch.tensor([ids]))
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, ids.index(tok.eos_token_id)])
