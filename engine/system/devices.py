"""Every memory and device question the engine and the UI ask, answered in one module.

hardware.py detects what the machine has (once, at start); this module answers questions about
now: how much memory is free on the device a job will use, how much this process holds, whether an
error means out of memory, how to give memory back, and the peak memory of a block of work.
Nothing else reads torch.cuda or psutil for these.
"""
from __future__ import annotations

import gc
import threading
from dataclasses import dataclass

import psutil

GIB = 1024**3
# Activations grow with pixels x batch x UNet width: about 5 KB per pixel for SD 1.5 at batch 1 with
# guidance (measured: 512x512 peaks ~1.3 GiB above the weights).
BYTES_PER_PIXEL = 5000


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def process_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def free_bytes(device: str) -> int:
    """Memory a new job can still take on `device`: free VRAM on CUDA, available RAM elsewhere."""
    if is_cuda(device):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    return int(psutil.virtual_memory().available)


def job_bytes(unet_width: int, width: int, height: int, batch: int) -> float:
    """Rough activation memory of one job (see BYTES_PER_PIXEL); unet_width is the first block's channels."""
    return batch * width * height * BYTES_PER_PIXEL * (unet_width / 320)


def check_job_fits(device: str, unet_width: int, width: int, height: int, batch: int) -> None:
    """Refuse, before any work, a job that clearly cannot fit in the memory free on its device."""
    from engine.errors import UserError

    need, free = job_bytes(unet_width, width, height, batch), free_bytes(device)
    if need > free:
        where = "VRAM" if is_cuda(device) else "RAM"
        raise UserError(f"{batch} image(s) at {width}x{height} need about {need / GIB:.0f} GiB and {free / GIB:.0f} GiB "
                        f"{where} is free: lower the size or batch size (or use tiled upscale).")


@dataclass
class LiveMemory:
    ram_bytes: int
    vram_bytes: int | None  # None where the job does not use CUDA

    def text(self) -> str:
        vram = "n/a" if self.vram_bytes is None else f"{self.vram_bytes / GIB:.2f} GiB"
        return f"RAM {self.ram_bytes / GIB:.2f} GiB · VRAM {vram}"


def live_memory(device: str) -> LiveMemory:
    """What this process holds right now (for the live line while a job runs)."""
    vram = None
    if is_cuda(device):
        import torch

        vram = int(torch.cuda.memory_allocated())
    return LiveMemory(process_rss_bytes(), vram)


def machine_memory(device: str) -> tuple[dict[str, int], dict[str, int] | None]:
    """This machine's RAM {free, used, total} in bytes, and the CUDA device's (None where `device` is not CUDA)."""
    vm = psutil.virtual_memory()
    ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
    if not is_cuda(device):
        return ram, None
    import torch

    free, total = torch.cuda.mem_get_info()
    return ram, {"free": int(free), "used": int(total - free), "total": int(total)}


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    try:
        import torch

        if isinstance(error, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "not enough memory" in text
                                                or "failed to allocate" in text)


def release(device: str) -> None:
    """Give back what a failed or finished job left: Python garbage, the C heap's free pages (glibc keeps them,
    so a burst of large inputs left the process gigabytes bigger), and the CUDA cache on a GPU."""
    gc.collect()
    trim_heap()
    if is_cuda(device):
        import torch

        torch.cuda.empty_cache()


class PeakMemory:
    """Peak process RSS (sampled in a thread) and, on CUDA, peak allocated/reserved VRAM over a block."""

    def __init__(self, device: str, interval_s: float = 0.01):
        self.cuda = is_cuda(device)
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_rss_bytes = 0
        self.vram_allocated_bytes: int | None = None
        self.vram_reserved_bytes: int | None = None

    def _sample(self) -> None:
        self.peak_rss_bytes = max(self.peak_rss_bytes, self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.vram_allocated_bytes = int(torch.cuda.max_memory_allocated())
            self.vram_reserved_bytes = int(torch.cuda.max_memory_reserved())


def trim_heap() -> None:
    """Free pages of the C heap back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        pass
