"""DeepCache-style feature reuse for a diffusers UNet2DConditionModel (PyTorch runtime).

Between denoising steps the UNet's deep features change slowly (Ma et al., "DeepCache", 2023).
Every `interval` calls the whole UNet runs and the input of its last up block is kept; the
calls between run only conv_in, the first down block and that last up block, reusing the kept
deep features. A new generation (the timestep goes up, or the batch shape changes) starts
with a full call.
"""
from __future__ import annotations

import torch


class DeepCache:
    def __init__(self, unet, interval: int):
        if interval < 2:
            raise ValueError("DeepCache needs an interval of 2 or more")
        self.unet = unet
        self.interval = interval
        self.full_calls = 0
        self.shallow_calls = 0
        self._cached: torch.Tensor | None = None
        self._since_full = 0
        self._last_t: float | None = None
        self._shape: tuple | None = None

    def install(self) -> "DeepCache":
        self.unet.forward = self.forward  # instance attribute: nn.Module.__call__ runs it
        return self

    def reset_counts(self) -> None:
        self.full_calls = self.shallow_calls = 0

    def reset(self) -> None:
        """Forget the kept features: the next call is a full one (called at the start of every denoise)."""
        self._cached, self._since_full, self._last_t = None, 0, None

    def _block(self, block, h, emb, ehs, attention_mask, cross_attention_kwargs, **extra):
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=emb, encoder_hidden_states=ehs, attention_mask=attention_mask,
                         cross_attention_kwargs=cross_attention_kwargs, **extra)
        return block(hidden_states=h, temb=emb, **extra)

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=True, **unused):
        unet = self.unet
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        new_run = (self._last_t is None or t >= self._last_t or self._cached is None
                   or self._shape != tuple(sample.shape))
        self._shape = tuple(sample.shape)
        self._last_t = t
        full = new_run or self._since_full >= self.interval - 1
        self._since_full = 0 if full else self._since_full + 1

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
        up_factor = 2 ** unet.num_upsamplers
        odd_size = any(d % up_factor for d in sample.shape[-2:])

        h = unet.conv_in(sample)
        residuals = (h,)
        for block in (unet.down_blocks if full else unet.down_blocks[:1]):
            h, res = self._block(block, h, emb, ehs, attention_mask, cross_attention_kwargs)
            residuals += res
        last = unet.up_blocks[-1]
        n_last = len(last.resnets)
        if full:
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
                h = self._block(block, h, emb, ehs, attention_mask, cross_attention_kwargs,
                                res_hidden_states_tuple=res, **extra)
            self._cached = h.clone()  # a compiled UNet (CUDA graphs) may reuse h's memory on its next call
            self.full_calls += 1
        else:
            h = self._cached
            self.shallow_calls += 1
        h = self._block(last, h, emb, ehs, attention_mask, cross_attention_kwargs,
                        res_hidden_states_tuple=residuals[:n_last], upsample_size=None)
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        h = unet.conv_out(h)
        if not return_dict:
            return (h,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=h)
