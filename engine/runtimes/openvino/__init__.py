"""OpenVINO runtime: each heavy component converted to OpenVINO IR, compiled per static shape.

- Conversion uses openvino's own `convert_model` on the diffusers modules (no optimum-intel).
- The IR is cached on disk keyed by model identity, OpenVINO version and options; a second
  start reads it and never builds the PyTorch weights of cached components.
- Compiled models are kept in an LRU keyed by input shape, so warmed resolutions cost no
  compile; OpenVINO's CACHE_DIR keeps compiled blobs across starts.
- Adapters with the call signatures diffusers uses stand in for the PyTorch modules, so the
  same diffusers pipelines run on them.

Nothing here imports openvino at module level: the picker imports this package to ask whether
OpenVINO can run.
"""
from engine.runtimes.openvino.adapters import OVTextEncoder, OVUNet, OVVae
from engine.runtimes.openvino.compiled import CompiledModels, drop_mapped_pages, precision_name
from engine.runtimes.openvino.convert import CONVERSION_VERSION, PARTS_OF, TEXT_LENGTH, convert_part, job_shapes
from engine.runtimes.openvino.ir_cache import IRCache
from engine.runtimes.openvino.loader import IRLoader
from engine.runtimes.openvino.quantize import hybrid_quantize
from engine.runtimes.openvino.runtime import DEFAULT_CACHE_DIR, OpenVINORuntime

__all__ = ["CONVERSION_VERSION", "DEFAULT_CACHE_DIR", "PARTS_OF", "TEXT_LENGTH", "CompiledModels", "IRCache",
           "IRLoader", "OVTextEncoder", "OVUNet", "OVVae", "OpenVINORuntime", "convert_part", "drop_mapped_pages",
           "hybrid_quantize", "job_shapes", "precision_name"]
