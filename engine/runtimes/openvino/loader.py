"""Each part's ov.Model for one pipeline: from the disk cache, or converted (int8 where asked) and cached."""
from __future__ import annotations

import gc
import logging
import time
from typing import Any

import numpy as np
import torch

from engine.errors import RuntimeUnavailable
from engine.runtimes.openvino.convert import PARTS_OF, convert_part, is_meta
from engine.runtimes.openvino.ir_cache import IRCache
from engine.runtimes.openvino.quantize import calibration_inputs, can_calibrate, compress

log = logging.getLogger(__name__)


class IRLoader:
    def __init__(self, core, ir_cache: IRCache, variant: str, int8: bool, hybrid: bool, parts=PARTS_OF):
        self.core, self.ir_cache, self.variant = core, ir_cache, variant
        self.parts = parts  # pipeline component -> IR parts (convert.parts_of)
        self.int8, self.hybrid = int8 or hybrid, hybrid
        self.conversions: list[tuple[str, float]] = []  # (part, seconds) converted in this process

    def cached_components(self, identity_of) -> set[str]:
        """Pipeline components whose every IR part is valid in the disk cache (identity_of(component): its key)."""
        return {component for component, parts in self.parts.items()
                if (identity := identity_of(component)) and all(self.ir_cache.valid(identity, self.variant, p)
                                                                for p in parts)}

    def ir(self, identity: str | None, part: str, component, calibration: list[dict[str, np.ndarray]]) -> Any:
        """The part's ov.Model from the disk cache, or converted (and cached) from `component`."""
        # Outside the lock only a complete entry is read: an incomplete one may be another process's write.
        if identity and self.ir_cache.valid(identity, self.variant, part):
            model = self.ir_cache.load(self.core, identity, self.variant, part)
            if model is not None:
                return model
        if not identity:
            return self._convert(None, part, component, calibration)
        with self.ir_cache.converting(identity, self.variant, part):
            model = self.ir_cache.load(self.core, identity, self.variant, part)  # converted while we waited?
            return model if model is not None else self._convert(identity, part, component, calibration)

    def _convert(self, identity: str | None, part: str, component, calibration) -> Any:
        if component is None or is_meta(component):
            raise RuntimeUnavailable(f"OpenVINO IR for {part} is missing from the cache and no weights are loaded; "
                                     f"load the model again.")
        start = time.perf_counter()
        model = convert_part(part, component)
        if self.int8:
            model = compress(part, model, self.hybrid, calibration, component)
        self.conversions.append((part, time.perf_counter() - start))
        log.info("converted %s to OpenVINO in %.1f s", part, time.perf_counter() - start)
        if identity and self.ir_cache.save(model, identity, self.variant, part):
            # Read back the saved copy: its weights are file-backed, the converted one holds them in RAM.
            del model
            gc.collect()
            model = self.ir_cache.load(self.core, identity, self.variant, part)
        return model

    def calibration(self, pipe, identity_of) -> list[dict[str, np.ndarray]]:
        """UNet inputs for INT8-convolution calibration, made before the UNet is converted; none where
        int8 convolutions are off or the quantized UNet comes from the cache."""
        if not (self.hybrid and can_calibrate(pipe)):
            return []
        unet_id, text_id = identity_of("unet"), identity_of("text_encoder")
        # Every UNet graph is calibrated (DeepCache's shallow one too): skip only when all of them are cached.
        if unet_id and all(self.ir_cache.valid(unet_id, self.variant, p) for p in self.parts["unet"]):
            return []
        return calibration_inputs(pipe, lambda ids: self._text_states(pipe.text_encoder, text_id, ids))

    def _text_states(self, encoder, identity: str | None, ids: torch.Tensor) -> np.ndarray:
        if is_meta(encoder):  # its IR is cached and its weights were never built: run the IR
            compiled = self.core.compile_model(self.ir(identity, "text_encoder", None, []), "CPU")
            return np.concatenate([np.array(compiled({"input_ids": row[None].numpy()})[0]) for row in ids])
        with torch.no_grad():
            return encoder(ids)[0].float().numpy()
