"""What every benchmark section returns (:class:`Section`) and what a figure was measured on (:func:`machine`)."""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

# CPU features that decide which kernels run (oneDNN's AVX-512 / BF16 / AMX paths vs AVX2): a figure measured with
# one set does not carry over to a CPU without it
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


@dataclass
class Section:
    """One benchmark's result: a printable table and the same figures as JSON-able data."""

    name: str
    table: str
    data: dict[str, Any] = field(default_factory=dict)


def _cpuinfo() -> tuple[str | None, list[str]]:
    """The CPU model name and the :data:`CPU_FLAGS` it has, from ``/proc/cpuinfo`` (None, [] elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None, []
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name"), [f for f in CPU_FLAGS if f in flags]


def machine() -> dict[str, Any]:
    """What a figure was measured on: versions, CPU model and the vector extensions it has, CPUs this process may
    use, threads, GPU, date."""
    import os

    import timm

    cpu, flags = _cpuinfo()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(date=datetime.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
                timm=timm.__version__, cpu=cpu or platform.processor() or platform.machine(), cpu_flags=flags,
                cpus_usable=usable, threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
