"""ZeRO stage 1 on CPU (issue 18 item 7): ``optim.shard_state=true`` in a 2-process gloo run keeps about half of
AdamW's state per process, saves it as one shard per process, stops on SIGTERM and resumes to exactly the
weights and optimizer moments of a plain DDP run, which export to the same single-file encoder. A resume on
another process count is refused with one line."""

import subprocess

import pytest
import torch
from conftest import CPU_ENV, torchrun
from safetensors.torch import load_file
from test_faults import DRIVER, PRETRAIN, one_line_error
from test_pretrain import assert_same_weights

from simmim.cli import main
from simmim.weights import read_checkpoint

ARGS = [*PRETRAIN, "data.batch_size=4", "schedule.max_steps=8"]  # checkpoints at 4 and at the end
SHARDED = [*ARGS, "optim.shard_state=true"]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(2, *args), env=CPU_ENV, capture_output=True, text=True, timeout=300)


def state_tensors(state: dict) -> list[dict[str, torch.Tensor]]:
    """Per parameter, its AdamW state (exp_avg, exp_avg_sq, step) of an optimizer ``state_dict``."""
    return [entry for entry in state["state"].values() if entry]


def nbytes(entries: list[dict[str, torch.Tensor]]) -> int:
    return sum(v.nbytes for entry in entries for v in entry.values())


def test_sharded_adamw_halves_the_state_per_process_resumes_exactly_and_exports_like_ddp(tmp_path, capsys):
    ddp = launch("-m", "simmim", *ARGS, "--output", str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    out = tmp_path / "zero"
    stopped = launch(DRIVER, "signal:TERM:0:3", "--", *SHARDED, "--output", str(out))  # the vote stops at step 5
    assert stopped.returncode != 0 and "at step 5; checkpoint" in stopped.stderr, stopped.stderr[-3000:]
    shards = sorted(p.name for p in (out / "checkpoints" / "accelerate-00000005").iterdir())
    assert shards == ["optimizer-00000-of-00002.pt", "optimizer-00001-of-00002.pt"]
    resumed = launch("-m", "simmim", *SHARDED, "--output", str(out), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 5" in resumed.stderr

    full, sharded = (read_checkpoint(tmp_path / run / "checkpoints" / "ckpt-00000008.pt") for run in ("ddp", "zero"))
    assert sharded["optimizer"] is None and sharded["optimizer_shards"] == 2
    assert_same_weights(sharded["model"], full["model"])  # bit for bit (atol 0)
    # every parameter's moments live on exactly one process and equal DDP's, which every process holds in full
    reference = state_tensors(full["optimizer"])
    parts = [state_tensors(torch.load(out / "checkpoints" / "accelerate-00000008" / name, weights_only=True))
             for name in shards]
    assert sum(len(p) for p in parts) == len(reference)
    unmatched = list(reference)
    for entry in (e for part in parts for e in part):
        match = next(i for i, ref in enumerate(unmatched) if ref.keys() == entry.keys()
                     and all(ref[k].shape == entry[k].shape and torch.equal(ref[k], entry[k]) for k in ref))
        unmatched.pop(match)
    for part in parts:  # about half of DDP's per-process optimizer memory each
        assert 0.4 < nbytes(part) / nbytes(reference) < 0.6, [nbytes(p) for p in parts]

    exported = []
    for run in ("ddp", "zero"):
        target = tmp_path / f"{run}.safetensors"
        assert main(["export", str(tmp_path / run / "checkpoints" / "ckpt-00000008.pt"), "--out", str(target)]) == 0
        exported.append(load_file(target))
    assert_same_weights(*exported)

    # one process cannot take two shards: refused before anything is written
    assert main([*SHARDED, "--output", str(out), "--resume", "auto", "schedule.max_steps=10"]) == 2
    assert one_line_error(capsys) == (
        f"error: the optimizer state of {out / 'checkpoints' / 'ckpt-00000008.pt'} is sharded over 2 processes "
        "(optim.shard_state=true); resume it with 2 processes and optim.shard_state=true (this run: 1 process, "
        "optimizer not sharded)")
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000008.pt")["step"] == 8


def test_sharding_is_refused_where_fsdp_or_deepspeed_shard_already():
    from simmim.config import OptimConfig
    from simmim.errors import UserError
    from simmim.optim import shard_state

    cfg = OptimConfig(shard_state=True)
    assert shard_state(cfg, 2, "MULTI_CPU") and not shard_state(cfg, 1, "NO")
    assert not shard_state(OptimConfig(), 2, "MULTI_GPU")
    with pytest.raises(UserError, match="this run uses DEEPSPEED, which shards it itself; drop optim.shard_state"):
        shard_state(cfg, 8, "DEEPSPEED")
