"""``simmim demo``: the whole pipeline on real images that ship inside scikit-image / scikit-learn, in minutes on a
CPU. SimMIM-pretrain a small SwinV2 at 64 px / W4 on photos and digits, fine-tune it on the digits at 96 px / W6
(pretrained windows taken from the checkpoint), evaluate at the trained and a larger size, export the classifier.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from simmim import finetune, pretrain
from simmim.config import FinetuneConfig, PretrainConfig, load_config
from simmim.configs import resolve
from simmim.evaluate import evaluate_checkpoint, format_table

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    pretrain: dict
    finetune: dict
    table: str
    exported: list[Path]
    baseline: dict | None = None
    paths: dict[str, str] = field(default_factory=dict)


def run_demo(output: str | Path = "runs/demo", pretrain_steps: int = 300, finetune_epochs: int = 4,
             compare: bool = False, extra: list[str] | None = None) -> DemoResult:
    """Pretrain -> fine-tune -> evaluate -> export under ``output``. ``compare`` also fine-tunes from scratch with
    the same budget, to see what pretraining bought. ``extra`` are overrides applied to both configs' ``run``."""
    out = Path(output)
    shared = [f"run.{o}" for o in (extra or [])]
    pre_cfg = load_config(PretrainConfig, resolve("demo/pretrain"),
                          [f"run.output={out / 'pretrain'}", f"schedule.max_steps={pretrain_steps}", *shared])
    pre = pretrain.run(pre_cfg)

    ft_args = [f"schedule.epochs={finetune_epochs}", *shared]
    ft_cfg = load_config(FinetuneConfig, resolve("demo/finetune"),
                         [f"pretrained={pre['checkpoint']}", f"run.output={out / 'finetune'}", *ft_args])
    ft = finetune.run(ft_cfg)
    baseline = None
    if compare:
        base_cfg = load_config(FinetuneConfig, resolve("demo/finetune"),
                               [f"run.output={out / 'finetune-scratch'}", *ft_args])
        baseline = finetune.run(base_cfg)

    size, window = ft_cfg.model.img_size, ft_cfg.model.window_size
    rows = evaluate_checkpoint(ft["checkpoint"], ft_cfg.data.path, [(size, window), (size * 4 // 3, window * 4 // 3)])
    from simmim.export import export

    exported = export(ft["checkpoint"], "safetensors", out / "export" / "swinv2_pico_digits.safetensors")
    images = sorted((out / "pretrain" / "images").glob("*.png"))
    return DemoResult(pre, ft, format_table(rows), exported, baseline, {
        "tensorboard": f"tensorboard --logdir {out}",
        "reconstruction": str(images[-1]) if images else "",
    })


def summary(result: DemoResult) -> str:
    """The short report ``simmim demo`` prints."""
    pre, ft = result.pretrain, result.finetune
    lines = [
        "simmim demo: SimMIM pretraining -> fine-tuning at a new size/window -> evaluation -> export",
        f"  pretrain  swinv2_pico 64px W4, {pre['steps']} steps on embedded photos+digits: "
        f"masked L1 {pre['first_loss']:.3f} -> {pre['last_loss']:.3f}",
        f"  finetune  96px W6 (pretrained windows 4/4/4/2 from the checkpoint), {ft['steps']} steps on digits: "
        f"val top-1 {ft['last_top1']:.2f}% (best {ft['best_top1']:.2f}%)",
    ]
    if result.baseline is not None:
        lines.append(f"  baseline  same fine-tuning from random init: val top-1 {result.baseline['last_top1']:.2f}%")
    lines += ["  evaluation at the trained size and, without re-training, a larger one:"]
    lines += ["    " + row for row in result.table.splitlines()]
    lines += [
        f"  reconstructions: {result.paths['reconstruction']}",
        f"  checkpoints:     {pre['checkpoint']}, {ft['checkpoint']}",
        f"  exported:        {', '.join(str(p) for p in result.exported)}",
        f"  tensorboard:     {result.paths['tensorboard']}",
    ]
    return "\n".join(lines)
