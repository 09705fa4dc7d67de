"""The one place that detects devices and their abilities.

Nothing else in the project looks at torch.cuda or /proc/cpuinfo to decide anything.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import platform
from dataclasses import asdict, dataclass, field

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    vram_bytes: int
    capability: tuple[int, int]


@dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str
    logical_cores: int
    avx2: bool = False
    avx512: bool = False
    avx512_bf16: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False
    # The CPU's generation, which flags do not tell (a first-generation EPYC and a Zen 3 share AVX2):
    # "family/model/stepping" and every flag, for what is decided by measuring (runtimes/openvino/probe.py).
    generation: str = ""
    flags: tuple[str, ...] = ()  # sorted

    @property
    def identity(self) -> str:
        """One line naming this CPU for caches of per-machine measurements."""
        return f"{self.vendor}|{self.model}|{self.generation}|{self.logical_cores}|{','.join(self.flags)}"

    @property
    def has_fast_bf16(self) -> bool:
        """bf16 matmuls in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
        return self.avx512_bf16 or self.amx_bf16

    @property
    def vnni(self) -> bool:
        """int8 dot products in hardware (AVX512-VNNI, AVX-VNNI or AMX-INT8): what makes int8 convolutions pay."""
        return bool({"avx512_vnni", "avx_vnni"} & set(self.flags)) or self.amx_int8

    @property
    def kind(self) -> str:
        """The microarchitecture, where family/model name a known one ("Zen 4"); "" otherwise."""
        family, model = _family_model(self.generation)
        for vendor, fam, models, name in _KINDS:
            if vendor == self.vendor and fam == family and model in models:
                return name
        return ""

    def describe(self) -> str:
        """One line for the Engine tab: which CPU, and what it has that the precision choices hinge on."""
        family, model = _family_model(self.generation)
        where = ", ".join(filter(None, (self.kind, f"family {family}, model {model}" if family is not None else "")))
        simd = "AVX-512" if self.avx512 else "AVX2" if self.avx2 else "no AVX2"
        features = (("AVX512-BF16", self.avx512_bf16), ("VNNI", self.vnni), ("AMX", self.amx_bf16 or self.amx_int8))
        has = [n for n, on in features if on]
        lacks = [n for n, on in features if not on]
        bf16 = ("bf16 in hardware" if self.has_fast_bf16 else
                "no hardware bf16 (bf16 runs emulated, slower than fp32)")
        return (f"{self.model}" + (f" ({where})" if where else "") + f", {self.logical_cores} logical cores: {simd}"
                + (f" with {', '.join(has)}" if has else "") + (f"; no {', '.join(lacks)}" if lacks else "")
                + f"; {bf16}")


def _family_model(generation: str) -> tuple[int | None, int | None]:
    parts = generation.split("/")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None, None


# (vendor, family, models, name): the server and desktop CPUs this engine is measured on and their neighbours.
_KINDS = (
    ("AMD", 23, {1, 8, 17, 24}, "Zen / Zen+"),
    ("AMD", 23, {49, 96, 104, 113, 144, 160}, "Zen 2"),
    ("AMD", 25, set(range(0, 16)) | set(range(32, 48)) | set(range(64, 96)), "Zen 3"),
    ("AMD", 25, set(range(16, 32)) | set(range(96, 128)) | set(range(160, 176)), "Zen 4"),
    ("AMD", 26, set(range(0, 256)), "Zen 5"),
    ("Intel", 6, {85}, "Skylake-SP / Cascade Lake"),
    ("Intel", 6, {106, 108}, "Ice Lake-SP"),
    ("Intel", 6, {143}, "Sapphire Rapids"),
    ("Intel", 6, {207}, "Emerald Rapids"),
    ("Intel", 6, {173, 174}, "Granite Rapids"),
    ("Intel", 6, {151, 154}, "Alder Lake"),
    ("Intel", 6, {183, 186, 191}, "Raptor Lake"),
)


@dataclass(frozen=True)
class HardwareReport:
    cpu: CpuInfo
    ram_total_bytes: int
    cuda_devices: tuple[CudaDevice, ...] = ()
    mps_available: bool = False
    openvino_devices: tuple[str, ...] = ()
    openvino_version: str | None = None
    openvino_error: str | None = None  # "ExceptionType: message" where openvino is installed but fails
    torch_version: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def has_cuda(self) -> bool:
        return bool(self.cuda_devices)

    @property
    def intel_cpu(self) -> bool:
        return "intel" in self.cpu.vendor.lower()

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        gib = 1024**3
        c = self.cpu
        feats = [n for n, on in (("AVX2", c.avx2), ("AVX-512", c.avx512), ("AVX512-BF16", c.avx512_bf16),
                                 ("AMX-BF16", c.amx_bf16), ("AMX-INT8", c.amx_int8)) if on]
        feats += ["VNNI"] if c.vnni and not c.amx_int8 else []
        lines = [
            f"CPU: {c.model} ({c.vendor}{', ' + c.kind if c.kind else ''}"
            f"{', family/model/stepping ' + c.generation if c.generation else ''}), "
            f"{c.logical_cores} logical cores; features: {', '.join(feats) or 'none of note'}",
            f"RAM: {self.ram_total_bytes / gib:.1f} GiB",
        ]
        if self.cuda_devices:
            for d in self.cuda_devices:
                lines.append(f"CUDA {d.index}: {d.name}, {d.vram_bytes / gib:.1f} GiB VRAM, "
                             f"compute capability {d.capability[0]}.{d.capability[1]}")
        else:
            lines.append("CUDA: none")
        lines.append(f"MPS: {'yes' if self.mps_available else 'no'}")
        if self.openvino_version:
            lines.append(f"OpenVINO {self.openvino_version}: devices {', '.join(self.openvino_devices) or 'none'}"
                         + (f" ({self.openvino_error})" if self.openvino_error else ""))
        elif self.openvino_error:
            lines.append(f"OpenVINO: installed but does not import: {self.openvino_error}")
        else:
            lines.append("OpenVINO: not installed")
        lines.append(f"torch {self.torch_version}")
        lines.extend(self.notes)
        return "\n".join(lines)


def parse_cpuinfo(text: str, logical_cores: int | None = None) -> CpuInfo:
    """Read model, vendor and SIMD/AMX features from /proc/cpuinfo text."""
    model, vendor, flags = "unknown CPU", "unknown", set()
    generation = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("cpu family", "model", "stepping") and key not in generation:
            generation[key] = value.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key == "vendor_id" and vendor == "unknown":
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    if vendor == "GenuineIntel":
        vendor = "Intel"
    elif vendor == "AuthenticAMD":
        vendor = "AMD"
    return CpuInfo(
        model=model,
        vendor=vendor,
        logical_cores=logical_cores or os.cpu_count() or 1,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        avx512_bf16="avx512_bf16" in flags,
        amx_bf16="amx_bf16" in flags,
        amx_int8="amx_int8" in flags,
        generation="/".join(generation.get(k, "?") for k in ("cpu family", "model", "stepping")) if generation else "",
        flags=tuple(sorted(flags)),
    )


def _detect_cpu() -> CpuInfo:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read(), psutil.cpu_count(logical=True))
    except OSError:
        return CpuInfo(model=platform.processor() or platform.machine(), vendor="unknown",
                       logical_cores=psutil.cpu_count(logical=True) or 1)


def _detect_cuda() -> tuple[CudaDevice, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append(CudaDevice(index=i, name=p.name, vram_bytes=int(p.total_memory),
                                  capability=(p.major, p.minor)))
    return tuple(devices)


def _openvino_installed() -> bool:
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # a broken package can fail even to be found
        return True


def _detect_openvino() -> tuple[tuple[str, ...], str | None, str | None]:
    """(devices, version, error). Not installed: version and error None. Installed but broken: the error
    in one line for the user; the log keeps the traceback."""
    if not _openvino_installed():
        return (), None, None
    try:
        import openvino as ov
    except Exception as e:  # a broken install is reported, never fatal
        log.warning("openvino is installed but does not import", exc_info=True)
        return (), None, f"{type(e).__name__}: {e}"
    try:
        return tuple(ov.Core().available_devices), ov.get_version(), None
    except Exception as e:
        log.warning("OpenVINO imports but cannot list its devices", exc_info=True)
        return (), ov.get_version(), f"{type(e).__name__}: {e}"


def detect() -> HardwareReport:
    import torch

    ov_devices, ov_version, ov_error = _detect_openvino()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return HardwareReport(
        cpu=_detect_cpu(),
        ram_total_bytes=psutil.virtual_memory().total,
        cuda_devices=_detect_cuda(),
        mps_available=mps,
        openvino_devices=ov_devices,
        openvino_version=ov_version,
        openvino_error=ov_error,
        torch_version=torch.__version__,
    )
