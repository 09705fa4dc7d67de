"""DeepCache-style feature reuse for a diffusers UNet2DConditionModel, on PyTorch and OpenVINO.

Between denoising steps the UNet's deep features change slowly (Ma et al., "DeepCache", 2023).
Every `interval` calls the whole UNet runs and keeps the features where the shallow branch joins
it; the calls between run only the shallow branch: conv_in, the first layer (resnet and
attention) of the first down block, and the last up block's layers that take its skips, reusing
the kept features. That is DeepCache's smallest branch (layer 0, block 0). On SD 1.5 at 512x512 it
runs 3 of the 5 transformer blocks at full latent size, where most of the UNet's cost is: a shallow
call measured 25% of a full one on OpenVINO, against 45% when it ran the whole first down block and
last up block. A model with one layer per block has no smaller branch: there the shallow call runs
its whole first down block (its downsampler aside) and last up block.

A new generation (the timestep goes up, or the batch shape changes) starts with a full call; a batch
that halves (guidance dropped mid-pass by CFG truncation) keeps the conditional half of the kept
features.

`full_forward` and `shallow_forward` are the two halves as plain functions: the PyTorch runtime
calls them, and the OpenVINO runtime converts each into a graph of its own.
"""
from __future__ import annotations

import torch


def _block(block, h, emb, ehs, attention_mask=None, cross_attention_kwargs=None, **extra):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, encoder_hidden_states=ehs, attention_mask=attention_mask,
                     cross_attention_kwargs=cross_attention_kwargs, **extra)
    return block(hidden_states=h, temb=emb, **extra)


def _embed(unet, sample, timestep, encoder_hidden_states, class_labels, timestep_cond, added_cond_kwargs):
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = emb + class_emb
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs)
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                             added_cond_kwargs=added_cond_kwargs)
    return emb, ehs


SHALLOW_LAYERS = 1  # (resnet, attention) layers of the first down block that the shallow branch runs


def _layers(config) -> tuple[int, int]:
    """(layers of the first down block the shallow branch runs, layers of the last up block the full call runs
    before it keeps the features): the shallow branch runs the last up block's other layers, one per skip it has."""
    per_block = config.layers_per_block
    first = per_block if isinstance(per_block, int) else per_block[0]
    down = min(SHALLOW_LAYERS, first)
    return down, (first + 1) - (down + 1)


def _attend(block, i, h, ehs, attention_mask, cross_attention_kwargs):
    attentions = getattr(block, "attentions", None)
    if not attentions:
        return h
    return attentions[i](h, encoder_hidden_states=ehs, cross_attention_kwargs=cross_attention_kwargs,
                         attention_mask=attention_mask, return_dict=False)[0]


def _down_layers(block, h, emb, ehs, count, attention_mask, cross_attention_kwargs):
    """The first `count` layers of a down block, without its downsampler: (h, each layer's output)."""
    outputs = ()
    for i in range(count):
        h = _attend(block, i, block.resnets[i](h, emb), ehs, attention_mask, cross_attention_kwargs)
        outputs += (h,)
    return h, outputs


def _up_layers(block, h, emb, ehs, residuals, start, stop, attention_mask, cross_attention_kwargs):
    """Layers start..stop-1 of an up block, each taking its skip from the end of `residuals`: (h, the rest)."""
    for i in range(start, stop):
        h = torch.cat([h, residuals[-1]], dim=1)
        residuals = residuals[:-1]
        h = _attend(block, i, block.resnets[i](h, emb), ehs, attention_mask, cross_attention_kwargs)
    return h, residuals


def _head(unet, h, emb, ehs, residuals, start, attention_mask, cross_attention_kwargs):
    """The last up block from layer `start` (it has no upsampler), then the output layers."""
    last = unet.up_blocks[-1]
    h, _ = _up_layers(last, h, emb, ehs, residuals, start, len(last.resnets), attention_mask, cross_attention_kwargs)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def full_forward(unet, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                 attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None):
    """The whole UNet: (noise prediction, deep features = where the shallow branch joins the last up block)."""
    emb, ehs = _embed(unet, sample, timestep, encoder_hidden_states, class_labels, timestep_cond, added_cond_kwargs)
    odd_size = any(d % 2 ** unet.num_upsamplers for d in sample.shape[-2:])
    h = unet.conv_in(sample)
    residuals = (h,)
    for block in unet.down_blocks:
        h, res = _block(block, h, emb, ehs, attention_mask, cross_attention_kwargs)
        residuals += res
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=ehs, attention_mask=attention_mask,
                               cross_attention_kwargs=cross_attention_kwargs)
        else:
            h = unet.mid_block(h, emb)
    pending = residuals
    for block in unet.up_blocks[:-1]:
        res, pending = pending[-len(block.resnets):], pending[:-len(block.resnets)]
        extra = {"upsample_size": pending[-1].shape[2:] if odd_size else None}
        h = _block(block, h, emb, ehs, attention_mask, cross_attention_kwargs, res_hidden_states_tuple=res, **extra)
    last = unet.up_blocks[-1]
    if last.upsamplers is not None or getattr(last, "b1", None):
        raise ValueError("DeepCache needs a last up block without an upsampler, and FreeU off")
    _, before = _layers(unet.config)
    h, pending = _up_layers(last, h, emb, ehs, pending, 0, before, attention_mask, cross_attention_kwargs)
    return _head(unet, h, emb, ehs, pending, before, attention_mask, cross_attention_kwargs), h


def shallow_forward(unet, sample, timestep, encoder_hidden_states, deep, class_labels=None, timestep_cond=None,
                    attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None):
    """The shallow branch around kept deep features: the noise prediction."""
    emb, ehs = _embed(unet, sample, timestep, encoder_hidden_states, class_labels, timestep_cond, added_cond_kwargs)
    down, before = _layers(unet.config)
    h = unet.conv_in(sample)
    _, outputs = _down_layers(unet.down_blocks[0], h, emb, ehs, down, attention_mask, cross_attention_kwargs)
    return _head(unet, deep, emb, ehs, (h,) + outputs, before, attention_mask, cross_attention_kwargs)


def deep_channels(config) -> int:
    """Channels of the deep features: a layer of the last up block's output, or where none of its layers runs
    before them, the second-to-last up block's output."""
    channels = list(config.block_out_channels)
    if _layers(config)[1] > 0:
        return channels[0]
    return channels[1] if len(channels) > 1 else channels[0]


class Schedule:
    """Which calls run the whole UNet and which reuse the kept features; counts both. interval 1: every
    call full (used to check the split against the plain UNet). `start`: the fraction of each pass's steps
    that run full before any reuse (the picture's layout forms in the first, noisiest steps)."""

    def __init__(self, interval: int, start: float = 0.0):
        if interval < 1:
            raise ValueError("DeepCache needs an interval of 1 or more")
        self.interval, self.start = interval, start
        self._full_first = 0  # calls of this pass that must run full
        self.calls: dict[str, int] = {}  # "full x2", "shallow x1"...: graph and UNet batch
        self.kept = None
        self._since_full = 0
        self._last_t: float | None = None
        self._batch: int | None = None

    def reset_counts(self) -> None:
        self.calls = {}

    @property
    def full_calls(self) -> int:
        return sum(n for kind, n in self.calls.items() if kind.startswith("full"))

    @property
    def shallow_calls(self) -> int:
        return sum(n for kind, n in self.calls.items() if kind.startswith("shallow"))

    def reset(self, steps: int = 0) -> None:
        """Forget the kept features: the next call is a full one (called at the start of every denoise of `steps`)."""
        self.kept, self._since_full, self._last_t, self._batch = None, 0, None, None
        self._full_first = int(self.start * steps + 0.5)

    def next_is_full(self, t: float, shape: tuple) -> bool:
        """Decide for a call at timestep `t` with a sample of `shape`; the kept features follow a halved batch."""
        batch = shape[0]
        if self.kept is not None and self._batch is not None and batch * 2 == self._batch:
            self.kept = self.kept[batch:]  # guidance dropped: keep the conditional half (diffusers: [uncond, cond])
            self._batch = batch
        new_run = (self._last_t is None or t >= self._last_t or self.kept is None or self._batch != batch
                   or tuple(self.kept.shape[-2:]) != tuple(shape[-2:]))
        self._last_t = t
        full = new_run or self._since_full >= self.interval - 1 or self._full_first > 0
        self._full_first -= 1
        self._since_full = 0 if full else self._since_full + 1
        kind = "full" if full else "shallow"
        self.calls[f"{kind} x{batch}"] = self.calls.get(f"{kind} x{batch}", 0) + 1
        return full

    def keep(self, deep, batch: int) -> None:
        self.kept, self._batch = deep, batch


class DeepCache(Schedule):
    """The PyTorch side: replaces the UNet's forward with full or shallow calls as the schedule says."""

    def __init__(self, unet, interval: int, start: float = 0.0):
        if interval < 2:
            raise ValueError("DeepCache needs an interval of 2 or more")
        super().__init__(interval, start)
        self.unet = unet

    def install(self) -> "DeepCache":
        self.unet.forward = self.forward  # instance attribute: nn.Module.__call__ runs it
        return self

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=True, **unused):
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        common = dict(class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
                      cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs)
        if self.next_is_full(t, tuple(sample.shape)):
            out, deep = full_forward(self.unet, sample, timestep, encoder_hidden_states, **common)
            self.keep(deep.clone(), sample.shape[0])  # a compiled UNet (CUDA graphs) may reuse deep's memory
        else:
            out = shallow_forward(self.unet, sample, timestep, encoder_hidden_states, self.kept, **common)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)
