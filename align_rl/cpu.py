"""CPU settings of a worker process (Ray Train worker or actor): intra-op threads and denormals.

Denormal floats (|x| < 1.2e-38) cost tens of times more per operation on x86 CPUs. They appear
whenever a training signal vanishes: once the Diffusion-DPO loss saturates, its gradients are
~1e-9 and AdamW's second-moment state and updates go denormal. Measured on the demo learner
(one thread): 0.45 s per DPO step while the loss was live, 6.0 s per step after it saturated;
flushing denormals to zero keeps every step at the live cost (``bench/bench_align.py``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 CPU flags of native bf16 arithmetic (``/proc/cpuinfo``)."""


def configure_worker(threads: int | float = 1) -> int:
    """Use ``threads`` (at least 1) intra-op threads and flush denormals to zero; returns the
    thread count. ``torch.set_flush_denormal`` sets the calling thread's FTZ/DAZ flags, which
    covers all the work of a one-thread worker (the default here)."""
    n = max(1, int(threads))
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    return n


def has_bf16_flags(cpuinfo: str) -> bool:
    """Whether the first ``flags`` line of a ``/proc/cpuinfo`` text names native bf16 arithmetic."""
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    return any(f in flags for f in BF16_FLAGS)


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this machine's CPU does bf16 arithmetic natively (AVX512-BF16 or AMX, read from
    ``/proc/cpuinfo``; False elsewhere): there bf16 autocast speeds up matrix products; without it
    oneDNN emulates bf16, slower than float32 (``bench/bench_precision.py``)."""
    try:
        return has_bf16_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False
