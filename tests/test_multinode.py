"""The README's multi-node section (issue 18 item 6) stays true: its command lines parse as accelerate launches of
2 nodes x 16 processes running a valid simmim command on the bundled configs, the learning rate it quotes is what
the plan computes, and the refusal it quotes for a stream resumed on another process count is the code's."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.launch import launch_command_parser

from simmim.cli import build_parser
from simmim.config import PretrainConfig, load_config
from simmim.configs import resolve
from simmim.errors import UserError
from simmim.optim import plan_training
from simmim.run_dir import check_stream_layout

README = (Path(__file__).parents[1] / "README.md").read_text()


def section(title: str) -> str:
    return README.split(title, 1)[1].split("\n**", 1)[0]


def test_the_readme_multinode_lines_launch_2_nodes_of_8_with_ddp_fsdp_and_deepspeed():
    block = re.search(r"```bash\n(.*?)```", section("**Several nodes (2 nodes x 8 GPUs).**"), re.S)[1]
    # run the block with `accelerate` printing its arguments and `simmim` the real one (for `configs --path`)
    shell = (f'accelerate() {{ printf "%s\\n" "$@"; echo ---; }}; simmim() {{ "{sys.executable}" -m simmim "$@"; }}; '
             f"NODE_RANK=1; MAIN_IP=10.0.0.1\n{block}")
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True).stdout
    launches = [chunk.strip().splitlines() for chunk in out.split("---") if chunk.strip()]
    kinds = []
    for argv in launches:
        assert argv[0] == "launch"
        args = launch_command_parser().parse_args(argv[1:])
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, 1)
        assert (args.main_process_ip, args.main_process_port, args.module) == ("10.0.0.1", 29500, True)
        kinds.append(yaml.safe_load(Path(args.config_file).read_text())["distributed_type"])
        if kinds[-1] == "DEEPSPEED":
            assert args.deepspeed_multinode_launcher == "standard"
        assert args.training_script == "simmim"
        command = build_parser().parse_args(args.training_script_args)
        assert (command.config, command.resume) == ("pretrain/swinv2_base_192_w12_800ep", "auto")
    assert kinds == ["MULTI_GPU", "FSDP", "DEEPSPEED"]


def test_the_readme_lr_example_is_what_the_plan_computes():
    text = " ".join(section("- **Batch and learning rate.**").split())
    assert "16 GPUs x 128 give 2048 and lr 4e-4 from the recipe's 1e-4" in text
    cfg = load_config(PretrainConfig, resolve("pretrain/swinv2_base_192_w12_800ep"), [])
    plan = plan_training(cfg.schedule, cfg.optim, cfg.data.batch_size, 16, 5000)
    assert (cfg.data.batch_size, cfg.optim.base_lr) == (128, 1e-4)
    assert plan.global_batch == 2048 and plan.lr == pytest.approx(4e-4)


def test_a_stream_resumed_on_another_process_count_is_refused_with_the_readme_message():
    saved = {"processes": 16, "num_workers": 8, "batch_size": 128, "accumulation_steps": 1}
    with pytest.raises(UserError) as err:
        check_stream_layout(saved, {**saved, "processes": 8})
    quoted = " ".join(section("- **Resuming on a different number of processes.**").split())
    assert f"`{err.value}`" in quoted
    check_stream_layout(saved, dict(saved))  # the same layout resumes
