"""Compare: one request run per preset, runtime, step count or sampler, on top of the Engine's interface."""
