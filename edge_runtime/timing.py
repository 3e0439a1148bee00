"""The timing core shared by the classifier, ``lungedge bench`` and the benchmark suite."""

from __future__ import annotations

import platform
import resource
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from .errors import ConfigError

import numpy as np

now = time.perf_counter


@dataclass(frozen=True)
class Summary:
    """Raw timings (milliseconds) and their summary."""

    raw_ms: tuple

    @property
    def n(self) -> int:
        return len(self.raw_ms)

    def to_dict(self, include_raw: bool = True) -> dict:
        a = np.asarray(self.raw_ms, dtype=np.float64)
        d = {
            "n": int(a.size),
            "mean_ms": float(a.mean()),
            "std_ms": float(a.std()),
            "min_ms": float(a.min()),
            "p50_ms": float(np.percentile(a, 50)),
            "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max()),
        }
        if include_raw:
            d["raw_ms"] = [round(float(x), 6) for x in a]
        return d


def time_calls(fn: Callable[[], object], runs: int, warmup: int = 0) -> Summary:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times, timing each call alone."""
    if runs < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    for _ in range(max(0, warmup)):
        fn()
    raw: List[float] = []
    for _ in range(runs):
        t0 = now()
        fn()
        raw.append((now() - t0) * 1e3)
    return Summary(tuple(raw))


def summarize(raw_ms: Sequence[float]) -> Summary:
    return Summary(tuple(float(x) for x in raw_ms))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this is ``VmHWM`` from /proc/self/status: ``getrusage``'s ``ru_maxrss`` survives
    ``exec``, so a process started from a large parent (e.g. one that loaded TensorFlow) would
    report the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _cpuinfo(prefixes: tuple) -> Optional[str]:
    """The value of the first /proc/cpuinfo line whose key starts with one of ``prefixes``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(prefixes):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo(("model name", "hardware", "cpu model")) or platform.processor() or "unknown"


#: CPU features that decide integer (int8) inference speed, as /proc/cpuinfo names them, and why.
INT8_FEATURES = {
    "x86_64": {
        "avx2": "AVX2: 256-bit integer SIMD (the baseline int8 path)",
        "avx512f": "AVX-512: 512-bit SIMD",
        "avx512_vnni": "AVX-512 VNNI: int8 multiply-accumulate in one instruction (VPDPBUSD)",
        "avx_vnni": "AVX-VNNI: the same on 256-bit registers",
        "amx_int8": "AMX-INT8: int8 tile matrix multiply",
        "avx512_bf16": "AVX-512 BF16",
    },
    "aarch64": {
        "asimd": "NEON (Advanced SIMD)",
        "asimddp": "NEON dot product (SDOT/UDOT): 4 int8 products per lane per instruction",
        "i8mm": "Int8 matrix multiply (SMMLA)",
        "sve": "SVE",
        "fphp": "half-precision float arithmetic (float16 kernels)",
    },
}


def cpu_features() -> dict:
    """Which of ``INT8_FEATURES`` this CPU has, from /proc/cpuinfo's ``flags`` (x86) or
    ``Features`` (ARM) line: ``{"arch": ..., "present": [...], "absent": [...], "notes": {...}}``."""
    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    known = INT8_FEATURES.get(arch, {})
    flags = set((_cpuinfo(("flags", "features")) or "").split())
    return {"arch": arch, "read": bool(flags), "present": [f for f in known if f in flags],
            "absent": [f for f in known if f not in flags], "notes": known}


def machine_info() -> dict:
    """What the numbers were measured on."""
    import os

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "hostname": platform.node(),
        "cpu_features": cpu_features(),
    }
