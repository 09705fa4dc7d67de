"""Stand-ins for the PyTorch components, with the call signatures diffusers uses, so the same
diffusers pipelines run on OpenVINO. Each forwards to the runtime's `infer(part, inputs)`."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from engine.errors import RuntimeUnavailable


class _Adapter:
    """What diffusers reads off a component besides calling it."""

    def __init__(self, runtime, part: str, config):
        self._runtime, self._part, self.config = runtime, part, config
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def to(self, *args, **kwargs):  # weights live in OpenVINO; moving is a no-op
        return self

    def modules(self):  # diffusers walks modules looking for offload hooks; there are none
        return iter((self,))

    def eval(self):
        return self


def _np(x: torch.Tensor, dtype=np.float32) -> np.ndarray:
    x = x.detach().to("cpu")
    return (x.float() if dtype == np.float32 else x).numpy().astype(dtype, copy=False)


class OVUNet(_Adapter):
    def __init__(self, runtime, config):
        super().__init__(runtime, "unet", config)
        if config.addition_embed_type == "text_time":
            # SDXL's pipeline reads the add-embedding width off the module.
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(
                in_features=config.projection_class_embeddings_input_dim))

    def __call__(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                 added_cond_kwargs=None, return_dict=True, **_):
        t = timestep.reshape(-1)[:1] if torch.is_tensor(timestep) else torch.tensor([float(timestep)])
        inputs = {"sample": _np(sample), "timestep": _np(t), "encoder_hidden_states": _np(encoder_hidden_states)}
        if added_cond_kwargs:
            inputs["text_embeds"] = _np(added_cond_kwargs["text_embeds"])
            inputs["time_ids"] = _np(added_cond_kwargs["time_ids"])
        if self.config.time_cond_proj_dim:
            if timestep_cond is None:
                raise RuntimeUnavailable("This model needs a guidance embedding (timestep_cond) input.")
            inputs["timestep_cond"] = _np(timestep_cond)
        out = torch.from_numpy(self._runtime.unet(inputs))
        return SimpleNamespace(sample=out) if return_dict else (out,)


class OVVae(_Adapter):
    def __init__(self, runtime, config):
        super().__init__(runtime, "vae", config)

    def decode(self, z, return_dict=True, generator=None):
        image = torch.from_numpy(self._runtime.infer("vae_decoder", {"latent": _np(z)})[0])
        return SimpleNamespace(sample=image) if return_dict else (image,)

    def encode(self, x, return_dict=True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = torch.from_numpy(self._runtime.infer("vae_encoder", {"image": _np(x)})[0])
        dist = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)


class _TextOutput:
    def __init__(self, last, penultimate, pooled, with_projection: bool, layers: int):
        self.last_hidden_state = last
        self.hidden_states = tuple([None] * (layers - 1) + [penultimate, last])
        self.text_embeds = pooled if with_projection else None
        self.pooler_output = None if with_projection else pooled
        self._first = pooled if with_projection else last

    def __getitem__(self, i):
        if i == 0:
            return self._first
        if i == 1 and self.pooler_output is not None:
            return self.pooler_output
        raise IndexError(i)


class OVTextEncoder(_Adapter):
    def __init__(self, runtime, part, config, with_projection: bool):
        super().__init__(runtime, part, config)
        self.with_projection = with_projection

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=True, **_):
        last, penult, pooled = (torch.from_numpy(a) for a in self._runtime.infer(self._part, {
            "input_ids": _np(input_ids, np.int64)}))
        return _TextOutput(last, penult, pooled, self.with_projection, self.config.num_hidden_layers)


def make_adapter(runtime, component: str, config) -> _Adapter:
    """The stand-in for pipeline component `component` (a key of PARTS_OF)."""
    if component == "unet":
        return OVUNet(runtime, config)
    if component == "vae":
        return OVVae(runtime, config)
    return OVTextEncoder(runtime, component, config, with_projection=component == "text_encoder_2")
