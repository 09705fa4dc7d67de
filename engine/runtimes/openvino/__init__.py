"""OpenVINO runtime (see runtime.py)."""
from .runtime import (DEFAULT_CACHE_DIR, IRCache, OpenVINORuntime, convert_part, drop_mapped_pages, hybrid_quantize,
                      precision_name)

__all__ = ["DEFAULT_CACHE_DIR", "IRCache", "OpenVINORuntime", "convert_part", "drop_mapped_pages", "hybrid_quantize",
           "precision_name"]
