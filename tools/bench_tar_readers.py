"""Reading speed (no decoding) of the same tar shards by three readers: ours (``TarShardSource``: Python's tar
reader + webdataset's key grouping), webdataset's ``WebDataset`` pipeline, and the ``datasets`` "webdataset"
builder streamed. 2000 generated 500x375 JPEGs in 20 shards; medians of 5 alternating rounds; prints JSON.

    python tools/bench_tar_readers.py > docs/benchmarks/tar_readers.json
"""

import json
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import webdataset as wds

from simmim.benchmarks.pipeline import make_test_jpegs, write_tar_shards
from simmim.data.shards import TarShardSource


def main() -> None:
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="simmim-readers-") as tmp:
        paths = make_test_jpegs(Path(tmp) / "f", (500, 375), 2000)
        urls = [str(p) for p in write_tar_shards(Path(tmp) / "s", paths, 20)]

        def ours() -> int:
            return sum(1 for _ in TarShardSource(urls, "s").iter_raw())

        def webdataset() -> int:
            return sum(1 for _ in wds.WebDataset(urls, shardshuffle=False))

        def hf_builder() -> int:
            ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True)
            return sum(1 for _ in ds.decode(False))

        readers = {"ours": ours, "webdataset": webdataset, "datasets webdataset builder": hf_builder}
        for read in readers.values():
            read()  # warm-up: page cache, imports
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(5):
            for name, read in readers.items():
                t0 = time.perf_counter()
                n = read()
                rates[name].append(n / (time.perf_counter() - t0))
    print(json.dumps({"command": "python tools/bench_tar_readers.py", "records": 2000, "shards": 20,
                      "records_per_s_median_of_5": {k: round(statistics.median(v), 1) for k, v in rates.items()}},
                     indent=2))


if __name__ == "__main__":
    main()
