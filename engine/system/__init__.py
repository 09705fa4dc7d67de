"""The machine: hardware detection, device memory, tensors leaving the model, timers and readouts."""
