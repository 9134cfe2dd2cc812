"""``simmim benchmark``: measured figures, side by side with a peer built from its documented recipe.

Sections (several per call):

* ``model`` and ``memory`` (:mod:`simmim.benchmarks.model`): the SimMIM training step, inference and activation memory
  of our SwinV2 against SimMIM on timm's ``SwinTransformerV2`` holding the same weights;
* ``pipeline`` (:mod:`simmim.benchmarks.pipeline`): the input pipeline against the official SimMIM one, then one
  worker's images/s on the same JPEGs as a folder, tar shards and parquet files, and optionally the time to the
  first batch of a large folder and of many shards;
* ``highres`` (:mod:`simmim.benchmarks.highres`): one training step on one high-resolution image per memory mode,
  against timm's SwinV2 with and without its checkpointing, each in its own process under a memory cap;
* ``index``: scan time and memory of the folder index on a synthetic tree of files;
* ``save`` (:mod:`simmim.benchmarks.save`): seconds a checkpoint save blocks training, direct vs ``run.async_save``.

:func:`run` measures what :class:`BenchmarkSettings` asks for; :func:`report` turns the sections into the printed
text and a JSON document that records the machine (CPU model and vector extensions, versions, threads).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch

from simmim.benchmarks.highres import CONTENDERS as HIGHRES_CONTENDERS
from simmim.benchmarks.report import Section, machine

WHAT = ("model", "memory", "highres", "pipeline", "index", "save")


@dataclass(frozen=True)
class BenchmarkSettings:
    """What to measure, and how (the ``simmim benchmark`` options)."""

    what: tuple[str, ...] = ("model",)
    model: str = "swinv2_tiny"
    img_size: int = 192
    window_size: int = 12
    batch_size: int = 8
    memory_batch_sizes: tuple[int, int] = (2, 4)  # memory: the peak-memory slope between these is MiB per image
    modes: tuple[str, ...] = ("train", "inference")  # model: training step and/or inference
    dtypes: tuple[str, ...] = ("float32",)
    rounds: int = 5
    iters: int = 2
    compile: bool = False
    threads: int | None = None  # pipeline: intra-op threads of the measuring process (None: 1, as a data worker)
    device: str | None = None  # None: cuda if available
    folder: str | None = None  # pipeline: a folder of your own images instead of generated JPEGs
    index_files: int = 1_000_000
    compare_list: bool = False
    save_dir: str | None = None  # save: the folder the checkpoints are written in (None: the system's temp folder)
    source_images: int = 512  # pipeline: JPEGs read as a folder, tar shards and parquet (0: skip)
    shards: int = 8  # pipeline: tar shards those JPEGs are packed into
    parquet_files: int = 4
    first_batch_files: int = 0  # pipeline: time to the first batch of a folder of this many files (0: skip)
    first_batch_shards: int = 0  # pipeline: ... and of this many tar shards (0: skip)
    memory_cap_gib: float = 12.0  # highres: each contender's memory cap
    step_timeout: float = 600.0  # highres: seconds a contender's process may run
    contenders: tuple[str, ...] = HIGHRES_CONTENDERS  # highres: memory modes and timm's


def run(settings: BenchmarkSettings) -> list[Section]:
    """Measure each section of ``settings.what`` in turn."""
    from simmim.benchmarks.highres import highres_section
    from simmim.benchmarks.model import memory_section, model_section
    from simmim.benchmarks.pipeline import index_section, pipeline_section, sources_section
    from simmim.benchmarks.save import save_section

    s, sections = settings, []
    for what in dict.fromkeys(s.what):
        if what == "model":
            sections.append(model_section(s.model, s.img_size, s.window_size, s.batch_size, list(s.dtypes),
                                          list(s.modes), s.rounds, s.iters, device=s.device, compile=s.compile))
        elif what == "memory":
            sections.append(memory_section(s.model, s.img_size, s.window_size, s.memory_batch_sizes,
                                           dtype=s.dtypes[0], rounds=s.rounds, device=s.device))
        elif what == "highres":
            sections.append(highres_section(s.model, s.img_size, s.window_size, cap_gib=s.memory_cap_gib,
                                            contenders=s.contenders, timeout_s=s.step_timeout, device=s.device,
                                            threads=s.threads))
        elif what == "pipeline":
            sections.append(pipeline_section(s.rounds, s.img_size, s.threads or 1, s.folder))
            if s.source_images or s.first_batch_files or s.first_batch_shards:
                sections.append(sources_section(s.source_images, s.shards, s.parquet_files, s.rounds, s.img_size,
                                                s.threads or 1, s.first_batch_files, s.first_batch_shards))
        elif what == "index":
            sections.append(index_section(s.index_files, s.compare_list))
        elif what == "save":
            sections.append(save_section(s.model, s.img_size, s.window_size, s.rounds, device=s.device,
                                         directory=s.save_dir))
        else:
            raise ValueError(f"unknown benchmark section {what!r}; one of {', '.join(WHAT)}")
    return sections


def report(settings: BenchmarkSettings, sections: list[Section]) -> tuple[str, dict]:
    """The text the command prints (a header with the machine, then each section's table) and the JSON document
    (machine, settings, command, every section's data). The header names the model only where a section timed it."""
    s, info = settings, machine()
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    flags = "/".join(info["cpu_flags"]) or "no AVX2"
    header = (f"{info['cpu']} ({flags}), {device}, {info['threads']} threads of {info['cpus_usable']} usable CPUs, "
              f"torch {info['torch']}, timm {info['timm']}, {info['date']}")
    names = {sec.name for sec in sections}
    if {"model", "memory"} & names:
        header = f"{s.model} {s.img_size}px W{s.window_size}; median of {s.rounds} interleaved rounds\n{header}"
    elif "highres" in names:
        header = f"{s.model} {s.img_size}px W{s.window_size}; one step per contender, batch 1\n{header}"
    lines = [header, *(f"\n[{sec.name}]\n{sec.table}" for sec in sections)]
    doc = dict(machine=info, settings=asdict(s), command="simmim " + " ".join(sys.argv[1:]),
               sections={sec.name: sec.data for sec in sections})
    return "\n".join(lines), doc
