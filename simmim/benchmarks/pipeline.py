"""Input pipeline throughput: ours against the official SimMIM pipeline on the same JPEG files, side by side.

The official pipeline is rebuilt from its documented recipe (``data/data_simmim_pt.py`` of microsoft/SimMIM): the
PIL loader (``Image.open(path).convert("RGB")``), torchvision ``RandomResizedCrop(192, scale=(0.67, 1),
ratio=(3/4, 4/3))``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (ImageNet statistics) and the numpy mask
generator (32 px cells, ratio 0.6, on the 4 px token grid). Ours is :class:`simmim.data.MaskedImageDataset` on an
:class:`~simmim.data.ImageFolderSource`, each sample seeded from (seed, epoch, index). Both make, per image, a
normalised (3, 192, 192) tensor and a (48, 48) mask, in this process with ``threads`` intra-op threads (1: what a
DataLoader worker uses).

Test images are skimage/scikit-learn photos resized (bicubic) to each size and saved as JPEG quality 90 in a
temporary folder; upscaled photos are smoother than camera output, so they compress better and decode faster than
real photos of the same size (``bytes_per_image`` is reported). ``folder=`` measures a folder of your own JPEGs.

Rounds alternate official, ours, official, ours ... over the same files, so noise on a shared machine hits both;
the result is the median images/s of each and their ratio.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simmim.benchmarks.report import Section
from simmim.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderSource, MaskedImageDataset, MaskGenerator
from simmim.data.samples import sample_photos
from simmim.data.transforms import pretrain_transform

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((500, 375), (4032, 3024))  # ImageNet-sized, 12 MP phone photo


@dataclass
class PipelineResult:
    name: str  # "500x375" or the folder
    images: int  # files per round
    bytes_per_image: float  # mean JPEG file size
    official_ips: float  # median images/s over rounds
    ours_ips: float
    rounds: int

    @property
    def ratio(self) -> float:
        return self.ours_ips / self.official_ips


class _OfficialMask:
    """The official SimMIM mask recipe: a random permutation of the cells of the mask grid from numpy's global RNG,
    the first ``ceil(ratio x cells)`` masked, upsampled to the token grid. (48, 48) int array at 192 px."""

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6) -> None:
        self.cells_per_side = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.count = self.cells_per_side**2
        self.masked = int(np.ceil(self.count * mask_ratio))

    def __call__(self) -> np.ndarray:
        chosen = np.random.permutation(self.count)[: self.masked]
        cells = np.zeros(self.count, dtype=int)
        cells[chosen] = 1
        cells = cells.reshape(self.cells_per_side, self.cells_per_side)
        return cells.repeat(self.scale, axis=0).repeat(self.scale, axis=1)


def official_pipeline(img_size: int = 192) -> Callable[[Path], tuple[torch.Tensor, np.ndarray]]:
    """path -> (image (3, S, S), mask (S/4, S/4)) exactly as the official SimMIM pretraining data pipeline."""
    from PIL import Image
    from torchvision import transforms as T

    transform = T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD)),
    ])
    mask = _OfficialMask(img_size)

    def load(path: Path) -> tuple[torch.Tensor, np.ndarray]:
        with open(path, "rb") as f:  # torchvision's pil_loader, as ImageFolder uses it
            img = Image.open(f).convert("RGB")
        return transform(img), mask()

    return load


def make_test_jpegs(folder: Path, size: tuple[int, int], count: int, quality: int = 90) -> list[Path]:
    """``count`` JPEGs of ``size`` (W, H) from the embedded photos (cycled), resized with bicubic filtering."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sample_photos()
    paths = []
    for i in range(count):
        path = folder / f"{size[0]}x{size[1]}_{i:04d}.jpg"
        photos[i % len(photos)].resize(size, resample=3).save(path, quality=quality)  # 3 = BICUBIC
        paths.append(path)
    return paths


def _measure(name: str, folder: Path, rounds: int, img_size: int, seed: int) -> PipelineResult:
    source = ImageFolderSource(folder)
    paths = [source.root / source.paths[i] for i in range(len(source))]
    ours = MaskedImageDataset(source, pretrain_transform(img_size), MaskGenerator(img_size, 32, 4, 0.6), seed=seed)
    official = official_pipeline(img_size)

    def run_official() -> float:
        t0 = time.perf_counter()
        for p in paths:
            official(p)
        return len(paths) / (time.perf_counter() - t0)

    def run_ours(epoch: int) -> float:
        t0 = time.perf_counter()
        for i in range(len(ours)):
            ours[(epoch, i)]
        return len(ours) / (time.perf_counter() - t0)

    run_official(), run_ours(0)  # warm-up: page cache, lazy imports, allocator
    official_ips, ours_ips = [], []
    for r in range(rounds):
        official_ips.append(run_official())
        ours_ips.append(run_ours(r + 1))
    size = statistics.mean(p.stat().st_size for p in paths)
    return PipelineResult(name, len(paths), size, statistics.median(official_ips), statistics.median(ours_ips),
                          rounds)


def run_pipeline_benchmark(sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, images: int | None = None,
                           rounds: int = 7, img_size: int = 192, threads: int = 1, folder: str | Path | None = None,
                           seed: int = 0) -> list[PipelineResult]:
    """Median images/s of the official SimMIM input pipeline and ours, per image size, measured side by side.

    Args:
        sizes: (W, H) of the generated test JPEGs, one result each (ignored when ``folder`` is given).
        images: JPEGs per size; default 64 below one megapixel, else 8.
        rounds: timed passes over the files for each pipeline, alternating.
        img_size: output side (192 in the SimMIM recipe).
        threads: torch intra-op threads while measuring (1 = one DataLoader worker), restored afterwards.
        folder: measure this folder of images instead of generated ones (one result).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if folder is not None:
            return [_measure(str(folder), Path(folder), rounds, img_size, seed)]
        results = []
        for w, h in sizes:
            count = images or (64 if w * h < 1_000_000 else 8)
            with tempfile.TemporaryDirectory(prefix="simmim-pipeline-") as tmp:
                make_test_jpegs(Path(tmp), (w, h), count)
                results.append(_measure(f"{w}x{h}", Path(tmp), rounds, img_size, seed))
        return results
    finally:
        torch.set_num_threads(previous)


def format_pipeline_results(results: Sequence[PipelineResult]) -> str:
    """A markdown table: images/s of both pipelines and the ratio, per image size."""
    lines = ["| images | files x KiB | official SimMIM, images/s | simmim, images/s | ratio |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.name} | {r.images} x {r.bytes_per_image / 1024:.0f} | {r.official_ips:.1f} | "
                     f"{r.ours_ips:.1f} | {r.ratio:.2f}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ folder index memory


@dataclass
class IndexResult:
    name: str  # "packed FileIndex" or "list of Paths"
    files: int
    scan_s: float  # seconds to scan the tree
    bytes_per_file: float  # memory the index holds once built
    worker_copy_mib: float | None  # private memory a forked worker gains by touching every entry (Linux)


def make_file_tree(root: Path, files: int, per_folder: int = 1000) -> None:
    """``files`` empty ``.JPEG`` files in folders of ``per_folder``, named like ImageNet (n00000000_123.JPEG)."""
    for start in range(0, files, per_folder):
        folder = root / f"n{start // per_folder:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(start + per_folder, files)):
            (folder / f"{folder.name}_{i}.JPEG").touch()


def scan_paths_list(root: Path) -> list[Path]:
    """The previous folder scan: every image as a ``Path`` in a sorted list (the reference for the comparison)."""
    import os

    from simmim.data.images import is_image_file

    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith(".") and is_image_file(f))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _private_dirty_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))


def worker_copy_mib(touch: Callable[[], None]) -> float | None:
    """Private memory (MiB) a forked child gains by running ``touch``: the pages a DataLoader worker copies from
    the main process when it reads the index. None where fork or /proc/self/smaps_rollup is unavailable."""
    import os

    if not hasattr(os, "fork") or not Path("/proc/self/smaps_rollup").exists():
        return None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, exit without running the parent's cleanup
        try:
            before = _private_dirty_kib()
            touch()
            os.write(write, str(_private_dirty_kib() - before).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return int(out) / 1024 if out else None


def run_index_benchmark(files: int = 1_000_000, compare_list: bool = False, root: str | Path | None = None
                        ) -> list[IndexResult]:
    """Scan time, bytes per file and worker copy of the packed folder index for a synthetic tree of ``files``
    empty files (created in a temporary folder, or ``root``, and deleted afterwards); with ``compare_list``, the
    same for the previous list of ``Path`` objects."""
    import gc
    import shutil
    import tracemalloc

    from simmim.data.file_index import FileIndex
    from simmim.data.images import is_image_file

    tmp = Path(tempfile.mkdtemp(prefix="simmim-index-", dir=root))
    try:
        make_file_tree(tmp, files)
        results = []
        gc.collect()
        t0 = time.perf_counter()
        index = FileIndex.scan(tmp, is_image_file)
        scan_s = time.perf_counter() - t0
        assert len(index) == files

        def touch_index() -> None:
            for i in range(len(index)):
                index.relative(i)

        results.append(IndexResult("packed FileIndex", files, scan_s, index.nbytes / files,
                                   worker_copy_mib(touch_index)))
        if compare_list:
            gc.collect()
            t0 = time.perf_counter()
            scan_paths_list(tmp)
            scan_s = time.perf_counter() - t0
            tracemalloc.start()  # a second scan to count the memory the list holds (tracemalloc slows the scan)
            paths = scan_paths_list(tmp)
            held, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()

            def touch_list() -> None:
                for p in paths:
                    str(p)

            results.append(IndexResult("list of Paths", files, scan_s, held / files, worker_copy_mib(touch_list)))
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def format_index_results(results: Sequence[IndexResult]) -> str:
    lines = ["| index | files | scan, s | bytes per file | copied by a forked worker touching all, MiB |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        copy = f"{r.worker_copy_mib:.1f}" if r.worker_copy_mib is not None else "n/a"
        lines.append(f"| {r.name} | {r.files} | {r.scan_s:.2f} | {r.bytes_per_file:.0f} | {copy} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- sources: shards, parquet


@dataclass
class SourceResult:
    source: str  # "folder", "tar shards", "parquet, streamed", "parquet, memory-mapped"
    layout: str  # "2000 files", "20 shards" ...
    images: int  # images per round
    ips: float  # median images/s in this process (one data worker's work)
    rounds: int


@dataclass
class FirstBatchResult:
    source: str
    layout: str
    seconds: float  # from the --data string to the first batch of ``batch`` samples, in this process
    batch: int


def write_tar_shards(folder: Path, paths: Sequence[Path], shards: int) -> list[Path]:
    """``paths`` packed into ``shards`` WebDataset tars (``KEY.jpg`` members, contiguous runs of files)."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(shards):
        out.append(folder / f"train-{s:04d}.tar")
        with tarfile.open(out[-1], "w") as tar:
            for i in range(len(paths) * s // shards, len(paths) * (s + 1) // shards):
                tar.add(paths[i], arcname=f"{i:08d}.jpg")
    return out


def write_parquet(folder: Path, paths: Sequence[Path], files: int) -> list[Path]:
    """``paths`` as ``files`` parquet files of one ``datasets.Image`` column (the hub's layout)."""
    import datasets

    datasets.disable_progress_bars()
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image()})
    out = []
    for f in range(files):
        part = paths[len(paths) * f // files: len(paths) * (f + 1) // files]
        out.append(folder / f"train-{f:05d}-of-{files:05d}.parquet")
        rows = [{"bytes": p.read_bytes(), "path": p.name} for p in part]
        datasets.Dataset.from_dict({"image": rows}, features=features).to_parquet(str(out[-1]))
    return out


def _samples(dataset: Any, epoch: int) -> Iterator[Any]:
    """The samples of one epoch of ``dataset`` (map-style: every index in order; a stream: one pass)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.set_epoch(epoch)
        return iter(dataset)
    return (dataset[(epoch, i)] for i in range(len(dataset)))


def _stream_or_dataset(spec: str, img_size: int, seed: int, streaming: bool = False, shuffle_buffer: int = 1000
                       ) -> Any:
    from simmim.data import MaskedImageStream, open_source

    source = open_source(spec, streaming=streaming)
    masks = MaskGenerator(img_size, 32, 4, 0.6)
    if getattr(source, "is_streaming", False):
        return MaskedImageStream(source, pretrain_transform(img_size), masks, seed=seed,
                                 shuffle_buffer=shuffle_buffer)
    return MaskedImageDataset(source, pretrain_transform(img_size), masks, seed=seed)


def _pass(dataset: Any, epoch: int, limit: int | None = None) -> int:
    """Read ``limit`` samples of epoch ``epoch`` (all when None); the number read."""
    return sum(1 for _ in itertools.islice(_samples(dataset, epoch), limit))


def run_sources_benchmark(images: int = 2000, shards: int = 20, parquet_files: int = 4, rounds: int = 3,
                          img_size: int = 192, threads: int = 1, size: tuple[int, int] = (500, 375),
                          seed: int = 0, chunk: int = 100) -> list[SourceResult]:
    """Images/s of one data worker reading the same ``images`` JPEGs (generated, ``size``) as a folder, as
    ``shards`` tar shards, and as ``parquet_files`` parquet files (streamed, and converted to the memory-mapped
    ``datasets`` cache). Each round reads one epoch of every source in alternating chunks of ``chunk`` images, so
    load from other processes hits all alike; the result is the median chunk rate. Streams read without a shuffle
    buffer here (it costs no decoding; its fill shows in the time to the first batch)."""
    import os

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="simmim-sources-") as tmp:
            root = Path(tmp)
            os.environ.setdefault("HF_DATASETS_CACHE", str(root / "hf-cache"))  # the conversion stays in tmp
            paths = make_test_jpegs(root / "folder", size, images)
            write_tar_shards(root / "shards", paths, shards)
            write_parquet(root / "parquet", paths, parquet_files)
            cases = [
                ("folder", f"{images} files", _stream_or_dataset(str(root / "folder"), img_size, seed)),
                ("tar shards", f"{shards} shards",
                 _stream_or_dataset(str(root / "shards"), img_size, seed, shuffle_buffer=0)),
                ("parquet, streamed", f"{parquet_files} files",
                 _stream_or_dataset(str(root / "parquet"), img_size, seed, streaming=True, shuffle_buffer=0)),
                ("parquet, memory-mapped", f"{parquet_files} files",
                 _stream_or_dataset(str(root / "parquet"), img_size, seed)),
            ]
            for _, _, ds in cases:
                _pass(ds, 0, limit=64)  # warm-up: page cache, lazy imports
            ips: dict[str, list[float]] = {name: [] for name, _, _ in cases}
            for r in range(rounds):  # each round one epoch of every source, in alternating chunks of `chunk` images
                running = {name: _samples(ds, r + 1) for name, _, ds in cases}
                while running:
                    for name in list(running):
                        t0 = time.perf_counter()
                        n = sum(1 for _ in itertools.islice(running[name], chunk))
                        if n < chunk:
                            del running[name]
                        if n:
                            ips[name].append(n / (time.perf_counter() - t0))
            return [SourceResult(name, layout, images, statistics.median(ips[name]), rounds)
                    for name, layout, _ in cases]
    finally:
        torch.set_num_threads(previous)


def first_batch_seconds(spec: str, batch: int = 8, img_size: int = 192) -> float:
    """Seconds from a ``--data`` string to the first ``batch`` samples in this process: resolving the source
    (folder scan, shard listing), the probe, and the samples."""
    t0 = time.perf_counter()
    ds = _stream_or_dataset(spec, img_size, 0)
    if isinstance(ds, torch.utils.data.IterableDataset):
        _pass(ds, 0, limit=batch)
    else:
        sampler = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))  # the shuffled first batch
        for i in sampler[:batch].tolist():
            ds[i]
    return time.perf_counter() - t0


def run_first_batch_benchmark(folder_files: int = 1_000_000, shards: int = 1000, per_shard: int = 4,
                              root: str | Path | None = None) -> list[FirstBatchResult]:
    """Time to the first batch of 8 for a folder of ``folder_files`` JPEGs (hard links to 64 small JPEGs, 1000
    per folder) and for ``shards`` tar shards of ``per_shard`` small JPEGs (a folder, and a brace pattern)."""
    import os
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="simmim-first-batch-", dir=root))
    try:
        jpegs = make_test_jpegs(tmp / "one", (256, 192), 64)  # files link to these (ext4: 65000 links per file)
        jpeg = jpegs[0]
        results = []
        if folder_files:
            tree = tmp / "tree"
            for start in range(0, folder_files, 1000):
                sub = tree / f"n{start // 1000:08d}"
                sub.mkdir(parents=True)
                for i in range(start, min(start + 1000, folder_files)):
                    os.link(jpegs[i % len(jpegs)], sub / f"{sub.name}_{i}.JPEG")
            results.append(FirstBatchResult("folder", f"{folder_files} files", first_batch_seconds(str(tree)), 8))
            shutil.rmtree(tree)
        if shards:
            write_tar_shards(tmp / "shards", [jpeg] * (shards * per_shard), shards)
            results.append(FirstBatchResult("tar shards, folder", f"{shards} shards",
                                            first_batch_seconds(str(tmp / "shards")), 8))
            pattern = str(tmp / "shards" / f"train-{{0000..{shards - 1:04d}}}.tar")
            results.append(FirstBatchResult("tar shards, brace pattern", f"{shards} shards",
                                            first_batch_seconds(pattern), 8))
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def format_source_results(results: Sequence[SourceResult], first: Sequence[FirstBatchResult] = ()) -> str:
    lines = []
    if results:
        lines += ["| source | layout | images | images/s per worker | vs folder |", "| --- | --- | --- | --- | --- |"]
    folder = next((r.ips for r in results if r.source == "folder"), None)
    for r in results:
        ratio = f"{r.ips / folder:.2f}" if folder else "n/a"
        lines.append(f"| {r.source} | {r.layout} | {r.images} | {r.ips:.1f} | {ratio} |")
    if first:
        lines += [""] if lines else []
        lines += ["| first batch of 8 | layout | seconds |", "| --- | --- | --- |"]
        lines += [f"| {r.source} | {r.layout} | {r.seconds:.2f} |" for r in first]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# the sections of simmim benchmark


def pipeline_section(rounds: int = 5, img_size: int = 192, threads: int = 1, folder: str | None = None) -> Section:
    """The input pipeline against the official SimMIM one : ImageNet-sized and 12 MP JPEGs
    generated from the embedded photos, or ``folder`` of your own images, with ``threads`` intra-op threads."""
    results = run_pipeline_benchmark(rounds=rounds, img_size=img_size, threads=threads, folder=folder)
    rows = [{**asdict(r), "ratio": r.ratio} for r in results]
    return Section("pipeline", format_pipeline_results(results), dict(img_size=img_size, rows=rows))


def sources_section(images: int = 2000, shards: int = 20, parquet_files: int = 4, rounds: int = 3,
                    img_size: int = 192, threads: int = 1, first_batch_files: int = 0, first_batch_shards: int = 0
                    ) -> Section:
    """One worker's images/s on the same JPEGs as a folder, tar shards and parquet; optionally the time to the
    first batch for a ``first_batch_files`` folder and ``first_batch_shards`` shards."""
    results = run_sources_benchmark(images, shards, parquet_files, rounds, img_size, threads) if images else []
    first = run_first_batch_benchmark(first_batch_files, first_batch_shards) \
        if first_batch_files or first_batch_shards else []
    return Section("sources", format_source_results(results, first),
                   dict(img_size=img_size, threads=threads, rows=[asdict(r) for r in results],
                        first_batch=[asdict(r) for r in first]))


def index_section(files: int = 1_000_000, compare_list: bool = False) -> Section:
    """Scan time and memory of the packed folder index on a synthetic tree of ``files`` files."""
    results = run_index_benchmark(files, compare_list=compare_list)
    return Section("index", format_index_results(results), dict(rows=[asdict(r) for r in results]))
