"""Streaming sharded across processes and DataLoader workers (issue 10 item 6): every record is read once per
epoch, by one reader only; samples are functions of (seed, epoch, global key); a stream resumes by position."""

from __future__ import annotations

import io
import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU_ENV, torchrun
from PIL import Image
from torch.utils.data import DataLoader

from simmim.data import HFImageSource, ImageFolderSource, MaskedImageStream, MaskGenerator, pretrain_transform
from simmim.data.stream import SHARD_KEY_BITS, reader_share

ROWS, SHARDS = 36, 6  # rows per shard: 6


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_sharded_parquet(root: Path, rows: int = ROWS, shards: int = SHARDS, bad: tuple[int, ...] = ()) -> list[str]:
    """A datasets image dataset saved as ``shards`` parquet files; rows listed in ``bad`` hold junk bytes."""
    import datasets

    images = [{"bytes": b"junk" if i in bad else _png(i), "path": None} for i in range(rows)]
    ds = datasets.Dataset.from_dict({"image": images, "n": list(range(rows))},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "n": datasets.Value("int64")}))
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(shards):
        path = root / f"train-{k:05d}.parquet"
        ds.shard(num_shards=shards, index=k, contiguous=True).to_parquet(str(path))
        files.append(str(path))
    return files


def open_stream(files: list[str], **kwargs) -> MaskedImageStream:
    import datasets

    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    source = HFImageSource.from_dataset(ds, name="sharded")
    return MaskedImageStream(source, pretrain_transform(32), MaskGenerator(32, 8, 4, 0.5), seed=7, **kwargs)


def all_keys(rows: int = ROWS, shards: int = SHARDS) -> list[int]:
    per = rows // shards
    return [(k << SHARD_KEY_BITS) | i for k in range(shards) for i in range(per)]


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 6, 7, 12])
def test_reader_shares_cover_every_record_once(shards: int) -> None:
    per_shard = 5
    for world, workers in ((1, 1), (1, 3), (2, 2), (3, 2), (2, 4)):
        seen = []
        for rank in range(world):
            for w in range(workers):
                picked, step, offset = reader_share(shards, rank, world, w, workers)
                sequence = [(k, i) for k in picked for i in range(per_shard)]
                seen += sequence[offset::step]
                if shards >= world * workers:
                    assert step == 1  # whole shards: this reader opens no other shard
        assert sorted(seen) == [(k, i) for k in range(shards) for i in range(per_shard)], (world, workers)


def test_sharded_stream_reads_each_record_once_for_any_worker_count(hf, tmp_path: Path) -> None:
    files = write_sharded_parquet(tmp_path / "parquet")
    stream = open_stream(files)
    assert stream.source.num_shards == SHARDS
    reference = {int(s["index"]): s for s in DataLoader(stream, batch_size=None, num_workers=0)}
    assert sorted(reference) == all_keys()
    for workers in (2, 3):
        out = list(DataLoader(stream, batch_size=None, num_workers=workers))
        keys = [int(s["index"]) for s in out]
        assert sorted(keys) == all_keys()  # exactly once
        for s in out:  # and the same sample, whatever the layout
            assert torch.equal(s["image"], reference[int(s["index"])]["image"])
            assert torch.equal(s["mask"], reference[int(s["index"])]["mask"])


def test_a_reader_opens_only_its_own_shards(hf, tmp_path: Path) -> None:
    stream = open_stream(write_sharded_parquet(tmp_path / "parquet"))
    opened = []
    iter_raw = stream.source.iter_raw

    def spy(shard=None, num_shards=None):
        opened.append(shard)
        return iter_raw(shard=shard, num_shards=num_shards)

    stream.source.iter_raw = spy
    stream.rank, stream.world_size = 1, 2
    keys = [key for key, _ in stream._records(worker=1, num_workers=3)]  # reader 4 of 6: shard 4 only
    assert opened == [4] and keys == [(4 << SHARD_KEY_BITS) | i for i in range(ROWS // SHARDS)]


def test_unreadable_records_are_filled_and_counted_once(hf, tmp_path: Path) -> None:
    files = write_sharded_parquet(tmp_path / "parquet", bad=(3, 4, 5, 6, 17))  # the end of shard 0, start of 1
    stream = open_stream(files)
    for workers in (0, 2):
        out = list(DataLoader(stream, batch_size=None, num_workers=workers))
        assert sorted(int(s["index"]) for s in out) == all_keys()
        assert sum(int(s["skipped"]) for s in out) == 5


def test_endless_stream_resumes_at_a_position(hf, tmp_path: Path) -> None:
    files = write_sharded_parquet(tmp_path / "parquet", bad=(8,))
    B, W, done, more = 4, 2, 7, 8  # 7 batches consumed, then 8 more: crosses the end of the first epoch

    def batches(start: int, count: int) -> list[dict]:
        stream = open_stream(files, batch_size=B, endless=True)
        stream.set_start(start)
        loader = DataLoader(stream, batch_size=B, num_workers=W, drop_last=True)
        it = iter(loader)
        return [next(it) for _ in range(count)]

    uninterrupted = batches(0, done + more)
    resumed = batches(done, more)
    for a, b in zip(uninterrupted[done:], resumed, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["skipped"], b["skipped"])
    keys = torch.cat([b["index"] for b in uninterrupted]).tolist()
    assert len(set(keys)) == ROWS and len(keys) == (done + more) * B  # the second epoch repeats the keys


def test_map_style_stream_splits_positions(tmp_path: Path) -> None:
    for i in range(10):
        Image.open(io.BytesIO(_png(i))).save(tmp_path / f"{i}.png")
    src = ImageFolderSource(tmp_path)
    keys = []
    for rank in range(2):
        stream = MaskedImageStream(src, pretrain_transform(32), MaskGenerator(32, 8, 4, 0.5), rank=rank, world_size=2)
        keys += [int(s["index"]) for s in DataLoader(stream, batch_size=None, num_workers=2)]
    assert sorted(keys) == list(range(10))


WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.utils.data import DataLoader
    sys.path.insert(0, {tests!r})
    from test_stream import open_stream
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    files = json.loads({files!r})
    out = {{}}
    # one epoch, 2 workers per process: which records this process saw
    stream = open_stream(files, rank=rank, world_size=world)
    samples = list(DataLoader(stream, batch_size=None, num_workers=2))
    out["keys"] = [int(s["index"]) for s in samples]
    bits = lambda m: "".join(map(str, m.flatten().int().tolist()))
    out["digests"] = {{int(s["index"]): [float(s["image"].double().sum()), bits(s["mask"])] for s in samples}}
    # endless training stream: 5 batches, then a resumed stream from batch 2
    def take(start, count):
        st = open_stream(files, rank=rank, world_size=world, batch_size=3, endless=True)
        st.set_start(start)
        it = iter(DataLoader(st, batch_size=3, num_workers=2, drop_last=True, persistent_workers=True))
        return [next(it)["index"].tolist() for _ in range(count)]
    out["run"] = take(0, 5)
    out["resumed"] = take(2, 3)
    with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_two_processes_two_workers_read_every_record_once(hf, tmp_path: Path) -> None:
    files = write_sharded_parquet(tmp_path / "parquet", rows=48, shards=8)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), files=json.dumps(files), out=str(tmp_path)))
    env = {**CPU_ENV, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(torchrun(2, str(script)), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    keys = ranks[0]["keys"] + ranks[1]["keys"]
    assert sorted(keys) == all_keys(48, 8)  # every record exactly once across 2 processes x 2 workers
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    single = {int(s["index"]): s for s in open_stream(files)}
    for r in ranks:  # the samples of one process equal those of a single-process run, key by key
        for key, (image_sum, mask_bits) in r["digests"].items():
            s = single[int(key)]
            assert image_sum == pytest.approx(float(s["image"].double().sum()), abs=1e-6)
            assert mask_bits == "".join(map(str, s["mask"].flatten().int().tolist()))
        assert r["resumed"] == r["run"][2:]  # resume continues where it stopped
