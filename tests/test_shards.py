"""WebDataset tar shards and parquet/arrow files as data: resolving --data, the split across ranks x workers, the
seeded shuffle buffer, resuming by position, unreadable members, pretraining and fine-tuning end to end."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from test_pretrain import TINY
from torch.utils.data import DataLoader

from simmim.cli import main
from simmim.data import MaskedImageStream, MaskGenerator
from simmim.data.labeled import open_labeled
from simmim.data.shards import TarIndexSource, TarShardSource, expand, resolve_files
from simmim.data.sources import HFImageSource, ImageFolderSource, open_source
from simmim.data.stream import SHARD_KEY_BITS
from simmim.data.transforms import pretrain_transform
from simmim.errors import InputNotFoundError, UserError

CORRUPT = 7  # the sample whose image member is garbage


def _image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_shards(folder: Path, shards: int = 4, per_shard: int = 5, prefix: str = "train", classes: int = 3,
                 seed: int = 0) -> list[int]:
    """``shards`` tars of ``per_shard`` samples: JPEG and PNG members, a ``.cls`` label (every third sample a
    ``.json`` one instead), sample ``CORRUPT`` with a garbage image. Returns the labels in order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels, k = [], 0
    for s in range(shards):
        with tarfile.open(folder / f"{prefix}-{s:04d}.tar", "w") as tar:
            for j in range(per_shard):
                ext = "png" if j % 2 else "jpg"
                data = b"not an image" if k == CORRUPT else _image_bytes(rng, "PNG" if ext == "png" else "JPEG")
                label = k % classes
                meta = ("json", json.dumps({"label": label}).encode()) if k % 3 == 2 else ("cls", str(label).encode())
                for name, payload in ((f"{prefix}{k:05d}.{ext}", data), (f"{prefix}{k:05d}.{meta[0]}", meta[1])):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                labels.append(label)
                k += 1
    return labels


def _stream(source, seed=0, **kw) -> MaskedImageStream:
    return MaskedImageStream(source, pretrain_transform(32), MaskGenerator(32, 8, 4, 0.6), seed=seed, **kw)


def _keys(stream: MaskedImageStream, workers: int = 1) -> list[tuple[int, int]]:
    """``(key, skipped)`` of every sample the stream gives, read in this process as each of ``workers`` DataLoader
    workers in turn would read it (the DataLoader's own workers are exercised by the end-to-end runs)."""
    out = []
    for worker in range(workers):
        info = SimpleNamespace(id=worker, num_workers=workers)
        with mock.patch("simmim.data.stream.get_worker_info", return_value=info):
            out += [(int(s["index"]), int(s["skipped"])) for s in stream]
    return out


def test_patterns_globs_and_folders_name_the_same_shards(tmp_path: Path) -> None:
    write_shards(tmp_path / "s")
    want = [str(tmp_path / "s" / f"train-{i:04d}.tar") for i in range(4)]
    assert expand(str(tmp_path / "s" / "train-{0000..0003}.tar")) == want
    for spec in (str(tmp_path / "s" / "train-{0000..0003}.tar"), str(tmp_path / "s" / "*.tar"), str(tmp_path / "s")):
        src = open_source(spec)
        assert isinstance(src, TarShardSource) and src.urls == want
    assert open_source(str(tmp_path / "s" / "train-{0001..0002}.tar")).urls == want[1:3]
    with pytest.raises(InputNotFoundError, match="do not exist"):
        open_source(str(tmp_path / "s" / "train-{0000..0009}.tar"))
    with pytest.raises(InputNotFoundError, match="matches no file"):
        open_source(str(tmp_path / "s" / "*.parquet"))
    (tmp_path / "s" / "x.parquet").write_bytes(b"")
    with pytest.raises(UserError, match="different kinds"):
        resolve_files(str(tmp_path / "s" / "*.*"))
    (tmp_path / "s" / "a.jpg").write_bytes(_image_bytes(np.random.default_rng(0), "JPEG"))
    assert isinstance(open_source(str(tmp_path / "s")), ImageFolderSource)  # images at the top: an image folder
    with pytest.raises(UserError, match="a.jpg, not a .tar"):
        open_source(str(tmp_path / "s" / "*.jpg"))


@pytest.mark.parametrize("shards", [8, 3])  # whole shards per reader; fewer shards than readers
def test_two_ranks_by_two_workers_read_every_sample_once_per_epoch(tmp_path: Path, shards: int) -> None:
    write_shards(tmp_path / "s", shards=shards, per_shard=3)
    src = open_source(str(tmp_path / "s"))
    seen = []
    for rank in range(2):
        seen += _keys(_stream(src, rank=rank, world_size=2, shuffle_buffer=4), workers=2)
    keys = sorted(k for k, _ in seen)
    assert keys == sorted((s << SHARD_KEY_BITS) | i for s in range(shards) for i in range(3))
    assert sum(skipped for _, skipped in seen) == 1  # the corrupt member, counted once
    if shards == 8:  # whole shards: every shard read by one reader only
        by_rank = [{k >> SHARD_KEY_BITS for k, _ in _keys(_stream(src, rank=r, world_size=2), 2)} for r in range(2)]
        assert not by_rank[0] & by_rank[1]


def test_shuffle_is_seeded_and_changes_with_the_epoch(tmp_path: Path) -> None:
    write_shards(tmp_path / "s", shards=4, per_shard=5)
    src = open_source(str(tmp_path / "s"))
    read_order = [k for k, _ in _keys(_stream(src))]

    def order(seed: int, epoch: int = 0) -> list[int]:
        stream = _stream(src, seed=seed, shuffle_buffer=6)
        stream.set_epoch(epoch)
        return [k for k, _ in _keys(stream)]

    assert order(1) == order(1)
    assert sorted(order(1)) == sorted(read_order)
    assert order(1) != read_order and order(1) != order(2) and order(1) != order(1, epoch=1)


def test_resuming_by_position_continues_the_uninterrupted_stream(tmp_path: Path) -> None:
    write_shards(tmp_path / "s", shards=4, per_shard=5)
    src = open_source(str(tmp_path / "s"))

    def batches(start: int, count: int) -> list[tuple[list[int], torch.Tensor]]:
        stream = _stream(src, seed=3, batch_size=3, endless=True, shuffle_buffer=5)
        stream.set_start(start)
        out = []
        for batch in DataLoader(stream, batch_size=3, num_workers=2):
            out.append((batch["index"].tolist(), batch["image"]))
            if len(out) == count:
                return out
        return out

    straight = batches(0, 12)  # past the end of the first epoch (20 records): the next one has another order
    resumed = batches(7, 5)
    for (ka, ia), (kb, ib) in zip(straight[7:], resumed, strict=True):
        assert ka == kb and torch.equal(ia, ib)


def test_a_corrupt_member_and_a_sample_without_image_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    write_shards(tmp_path / "s", shards=2, per_shard=5)
    with tarfile.open(tmp_path / "s" / "train-0001.tar", "a") as tar:  # a sample with a label only
        info = tarfile.TarInfo("lonely.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    out = list(_stream(open_source(str(tmp_path / "s"))))
    assert len(out) == 11 and sum(s["skipped"] for s in out) == 2
    assert "train00007.jpg" in caplog.text and "no image member" in caplog.text


def test_a_truncated_shard_is_retried_then_its_rest_counted_as_one_unreadable_record(tmp_path: Path,
                                                                                     caplog) -> None:
    write_shards(tmp_path / "s", shards=2, per_shard=5)
    path = tmp_path / "s" / "train-0001.tar"
    with tarfile.open(path) as tar:
        third = tar.getmembers()[4]  # the third sample's image
    path.write_bytes(path.read_bytes()[:third.offset_data + third.size // 2])  # cut inside it
    src = open_source(str(tmp_path / "s"))
    out = list(_stream(src))
    assert src.retries == 3 and caplog.text.count("retrying shard") == 3 and "giving up shard" in caplog.text
    # shard 0: 5 records; shard 1: its first sample (the second is given only once the third's first member is
    # read, and that read fails), then its unread rest (the corrupt member with it) as one unreadable record
    assert len(out) == 7 and sum(s["skipped"] for s in out) == 1 and "the rest of shard" in caplog.text


def test_pretraining_on_tar_shards_runs_end_to_end(tmp_path: Path) -> None:
    write_shards(tmp_path / "s", shards=4, per_shard=5)
    out = tmp_path / "run"
    assert main(["pretrain", "demo/pretrain", *TINY, "--data", str(tmp_path / "s" / "train-{0000..0003}.tar"),
                 "--output", str(out), "data.batch_size=4", "data.num_workers=2", "schedule.max_steps=6"]) == 0
    log = (out / "train.log").read_text()
    assert "step 6/6" in log and "train00007.jpg" in log  # the corrupt member was met and reported


def test_fine_tuning_reads_labels_from_cls_and_json_members(tmp_path: Path, capsys) -> None:
    labels = write_shards(tmp_path / "s", shards=3, per_shard=8)
    write_shards(tmp_path / "s", shards=1, per_shard=6, prefix="val", seed=1)
    train = open_labeled(str(tmp_path / "s"), "train")
    assert isinstance(train, TarIndexSource) and train.labels.tolist() == labels and train.classes == ["0", "1", "2"]
    assert len(open_labeled(str(tmp_path / "s" / "train-*.tar"), "val")) == 6  # "train" in a pattern -> "val"
    out = tmp_path / "ft"
    assert main(["finetune", "demo/finetune", "--data", str(tmp_path / "s"), "--output", str(out),
                 "run.progress=false", "model.img_size=64", "model.window_size=4", "schedule.max_steps=3",
                 "data.batch_size=8", "run.eval_every=3", "schedule.warmup_epochs=0.1"]) == 0
    assert "val top-1" in capsys.readouterr().out
    assert "train00007.png" in (out / "train.log").read_text()  # the corrupt member, skipped and counted


def _parquet(path: Path, n: int = 12) -> None:
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features
                               ).to_parquet(str(path))


def test_parquet_and_arrow_files_are_pretraining_and_fine_tuning_data(tmp_path: Path, hf) -> None:
    datasets = hf  # the cache in tmp_path, not the user's ~/.cache

    _parquet(tmp_path / "pq" / "train-00000-of-00002.parquet")
    _parquet(tmp_path / "pq" / "train-00001-of-00002.parquet")
    _parquet(tmp_path / "pq" / "validation-00000-of-00001.parquet", n=4)
    src = open_source(str(tmp_path / "pq"))
    assert isinstance(src, HFImageSource) and not src.is_streaming and len(src) == 24
    streamed = open_source(str(tmp_path / "pq" / "train-*.parquet"), streaming=True)
    assert streamed.is_streaming and streamed.num_shards == 2
    assert len(list(_stream(streamed))) == 24
    val = open_labeled(str(tmp_path / "pq"), "val", classes=["a", "b"])  # found as "validation"
    assert len(val) == 4 and val.labels.tolist() == [0, 1, 0, 1]
    arrow = datasets.load_dataset("parquet", data_files=str(tmp_path / "pq" / "train-00000-of-00002.parquet"),
                                  split="train", cache_dir=str(tmp_path / "cache"))
    cached = arrow.cache_files[0]["filename"]
    src = open_source(cached)
    assert isinstance(src, HFImageSource) and len(src) == 12 and src[0].size == (40, 40)
    out = tmp_path / "run"
    assert main(["pretrain", "demo/pretrain", *TINY, "--data", str(tmp_path / "pq" / "train-*.parquet"),
                 "--output", str(out), "data.batch_size=4", "data.streaming=true", "schedule.max_steps=3"]) == 0
