"""Per-process AdamW state of a 2-process CPU (gloo) pretraining run: plain DDP vs ZeRO stage 1
(``optim.shard_state=true``), on the SwinV2-T recipe shrunk to 64 px for a few steps (the state depends on the
parameters only, not on the image size). Each process reports the bytes of the optimizer state tensors it holds
(:func:`simmim.optim.optimizer_state_bytes`, in the run's summary).

    python tools/zero_memory.py --out docs/benchmarks/zero_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = "pretrain/swinv2_tiny_192_w12_800ep"
OVERRIDES = ["data.path=embedded:all", "model.img_size=64", "model.window_size=4", "data.mask_patch_size=32",
             "data.batch_size=2", "data.num_workers=0", "schedule.max_steps=2", "run.mixed_precision=no",
             "run.progress=false", "run.image_every=0", "run.threads=1"]
MODES = {"ddp": [], "zero": ["optim.shard_state=true"]}


def worker(mode: str, work: Path) -> None:
    """One process of a run under torchrun: pretrain, then write this process's figures."""
    from simmim.config import PretrainConfig, load_config
    from simmim.configs import resolve
    from simmim.pretrain import run

    cfg = load_config(PretrainConfig, resolve(RECIPE), [*OVERRIDES, *MODES[mode], f"run.output={work / mode}"])
    summary = run(cfg)
    rank = int(os.environ["RANK"])
    (work / f"{mode}-{rank}.json").write_text(json.dumps({"optimizer_state_bytes": summary["optimizer_state_bytes"],
                                                          "last_loss": summary["last_loss"]}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the JSON here (else print it)")
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.work)

    import torch

    from simmim.models import create_model

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result: dict = {"command": "python tools/zero_memory.py --out docs/benchmarks/zero_cpu.json",
                    "recipe": RECIPE, "overrides": OVERRIDES, "processes": 2, "backend": "gloo (CPU)",
                    "torch": torch.__version__, "python": platform.python_version(),
                    "note": "a shared 2-core machine; the figures are bytes, which do not depend on its load"}
    model = create_model("swinv2_tiny", img_size=64, window_size=4, num_classes=0)
    result["encoder_parameters"] = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for mode in MODES:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), __file__, "--worker", mode, "--work", str(work)]
            subprocess.run(cmd, env=env, check=True)
            ranks = [json.loads((work / f"{mode}-{r}.json").read_text()) for r in range(2)]
            result[mode] = {"optimizer_state_bytes_per_process": [r["optimizer_state_bytes"] for r in ranks],
                            "last_loss": ranks[0]["last_loss"]}
    ddp = max(result["ddp"]["optimizer_state_bytes_per_process"])
    result["zero_over_ddp_per_process"] = [round(b / ddp, 4) for b in
                                           result["zero"]["optimizer_state_bytes_per_process"]]
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
