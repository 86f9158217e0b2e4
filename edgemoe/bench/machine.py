"""What machine a benchmark ran on: CPU model and the instruction sets that matter, cores, RAM, versions.

Contract: `machine_info()` reads /proc/cpuinfo where it exists (falling back to `platform`) and asks
package metadata for versions, so it imports neither torch nor onnxruntime. The flags kept are the
ones that change which kernels ONNX Runtime and torch pick on x86: AVX2, AVX-512F, AVX-512 VNNI,
AVX-512 BF16 and AMX (ARM reports none of them).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
_PACKAGES = ("onnxruntime", "numpy", "torch", "accelerate")


@dataclass(frozen=True)
class MachineInfo:
    """The machine and software a report was measured on."""

    cpu_model: str
    cpu_flags: tuple[str, ...]  # the subset of FLAGS this CPU has
    logical_cores: int
    physical_cores: int | None
    ram_bytes: int
    onnxruntime_version: str | None
    python_version: str
    platform: str
    packages: tuple[tuple[str, str], ...] = ()  # (name, version) of numpy, torch, accelerate when installed

    @property
    def summary(self) -> str:
        flags = ", ".join(self.cpu_flags) or "no AVX2/AVX-512"
        return (f"{self.cpu_model}, {self.logical_cores} cores ({flags}), {self.ram_bytes / 1e9:.1f} GB RAM, "
                f"onnxruntime {self.onnxruntime_version or '?'}")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, tuple[str, ...]]:
    """(model name, present FLAGS) from the first processor block of /proc/cpuinfo."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), ()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model or platform.machine(), tuple(f for f in FLAGS if f in flags)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> MachineInfo:
    model, flags = _cpuinfo()
    versions = {name: _version(name) for name in _PACKAGES}
    return MachineInfo(
        cpu_model=model, cpu_flags=flags, logical_cores=os.cpu_count() or 1,
        physical_cores=psutil.cpu_count(logical=False), ram_bytes=int(psutil.virtual_memory().total),
        onnxruntime_version=versions.pop("onnxruntime"), python_version=platform.python_version(),
        platform=platform.platform(terse=True),
        packages=tuple((name, v) for name, v in versions.items() if v is not None))
