"""Reading a result's pictures in tests."""
import numpy as np


def pixels(result, index: int = 0) -> np.ndarray:
    """A result's image as int16 (differences of two images do not wrap around)."""
    return np.asarray(result.images[index], dtype=np.int16)
