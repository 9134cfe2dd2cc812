"""The packed folder index (issue 10 item 7): same files in the same order as the previous list of Paths, a few
dozen bytes a file, no Python object per file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simmim.benchmarks.pipeline import format_index_results, run_index_benchmark, scan_paths_list
from simmim.data import ImageFolderSource
from simmim.data.file_index import FileIndex, walk_sorted
from simmim.data.images import is_image_file
from simmim.data.labeled import ClassFolderSource

TRICKY = ["a.jpg", "a-b.jpg", "a/x.jpg", "a/b/y.png", "ab/y.jpg", "a b/z.jpg", "B.PNG", "b.png", "é.png",
          "z/0/1/2/deep.webp", "x.txt", ".hidden.jpg", ".cache/c.jpg", "m/.h/d.jpg", "n/data.npy"]


def _tree(root: Path, names: list[str] = TRICKY) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def test_walk_matches_the_sorted_list_of_paths(tmp_path: Path) -> None:
    _tree(tmp_path)
    expected = [p.relative_to(tmp_path).as_posix() for p in scan_paths_list(tmp_path)]
    index = FileIndex.scan(tmp_path, is_image_file)
    assert [index.relative(i) for i in range(len(index))] == expected
    (tmp_path / "loop").mkdir()
    os.symlink(tmp_path / "a", tmp_path / "loop" / "again")  # a second link to a folder: followed once
    os.symlink(tmp_path, tmp_path / "a" / "up")  # a loop
    assert [index.relative(i) for i in range(len(index))] == list(walk_sorted(tmp_path, is_image_file))
    assert "a-b.jpg" in expected and index.relative(0) == "B.PNG"  # byte order, as the previous sort
    assert ".hidden.jpg" not in str(list(walk_sorted(tmp_path, is_image_file)))
    assert list(index) == [tmp_path / index.relative(i) for i in range(len(index))]
    assert index[-1] == tmp_path / index.relative(len(index) - 1) and index.path(0) == str(tmp_path / "B.PNG")
    with pytest.raises(IndexError):
        index[len(index)]


def test_index_holds_no_python_object_per_file(tmp_path: Path) -> None:
    names = [f"n{c:08d}/n{c:08d}_{i}.JPEG" for c in range(20) for i in range(50)]
    _tree(tmp_path, names)
    index = FileIndex.scan(tmp_path, is_image_file)
    assert len(index) == 1000 and index.nbytes == sum(len(n) for n in names) + 8 * 1001
    assert index.nbytes / len(index) < 40
    assert {type(v) for v in vars(index).values()} <= {np.ndarray, str, type(tmp_path)}  # two arrays, no lists


def test_undecodable_file_names_round_trip(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.png")  # latin-1 bytes, not UTF-8: kept as surrogate escapes
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / name)
    src = ImageFolderSource(tmp_path)
    assert len(src) == 1 and src.paths[0].name == name and src[0].getpixel((0, 0)) == (1, 2, 3)


def test_class_folder_labels_follow_the_sorted_classes(tmp_path: Path) -> None:
    for c, n in (("dog", 3), ("cat", 2), ("cat-x", 1)):
        for i in range(n):
            p = tmp_path / c / "sub" / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(p)
    (tmp_path / "loose.png").write_bytes(b"")  # not in a class folder: ignored
    src = ClassFolderSource(tmp_path)
    assert src.classes == ["cat", "cat-x", "dog"]
    assert [src.samples[i][1] for i in range(len(src))] == [0, 0, 1, 2, 2, 2]
    assert [src.samples[i][0].parent.parent.name for i in range(len(src))] == ["cat", "cat", "cat-x"] + ["dog"] * 3
    assert src.labels.dtype == np.int32 and src[5][1] == 2 and src.open(5)[1] == 2


def test_index_benchmark_runs() -> None:
    results = run_index_benchmark(files=300, compare_list=True)
    packed, paths = results
    assert packed.files == paths.files == 300 and packed.bytes_per_file < paths.bytes_per_file / 4
    assert "packed FileIndex" in format_index_results(results)
