"""``simmim demo``: the whole pipeline on real images that ship inside scikit-image / scikit-learn, in minutes on a
CPU. SimMIM-pretrain a small SwinV2 at 64 px / W4 on photos and digits, fine-tune it on the digits at 96 px / W6
(pretrained windows taken from the checkpoint), evaluate at the trained and a larger size, export the classifier.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simmim import finetune, pretrain
from simmim.config import FinetuneConfig, PretrainConfig, load_config, replace
from simmim.configs import resolve
from simmim.errors import UserError
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
    configs: dict[str, Any] = field(default_factory=dict)


MARKER = ".simmim-demo"  # marks a folder the demo wrote, so a second demo may replace it


def run_demo(output: str | Path = "runs/demo", pretrain_steps: int = 300, finetune_epochs: int = 4,
             compare: bool = False, extra: list[str] | None = None) -> DemoResult:
    """Pretrain -> fine-tune -> evaluate -> export under ``output``. ``compare`` also fine-tunes from scratch with
    the same budget, to see what pretraining bought. ``extra`` are overrides applied to both configs' ``run``.

    A previous demo in ``output`` is replaced; any other non-empty folder is refused (nothing of yours is lost)."""
    out = Path(output)
    # both configs are loaded (and checked) before anything runs: a bad epoch count fails now, not after pretraining
    shared = [f"run.{o}" for o in (extra or [])]
    pre_cfg = load_config(PretrainConfig, resolve("demo/pretrain"),
                          [f"run.output={out / 'pretrain'}", f"schedule.max_steps={pretrain_steps}", *shared])
    ft_args = [f"schedule.epochs={finetune_epochs}", *shared]
    base_cfg = load_config(FinetuneConfig, resolve("demo/finetune"), [f"run.output={out / 'finetune-scratch'}",
                                                                        *ft_args])
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"{out} is not empty and was not written by simmim demo; pass another --output")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by simmim demo; a later demo replaces this folder\n")
    pre = pretrain.run(pre_cfg, overwrite=True)

    ft_cfg = replace(base_cfg, **{"pretrained": pre["checkpoint"], "run.output": str(out / "finetune")})
    ft = finetune.run(ft_cfg, overwrite=True)
    baseline = finetune.run(base_cfg, overwrite=True) if compare else None

    size, window = ft_cfg.model.img_size, ft_cfg.model.window_size
    rows = evaluate_checkpoint(ft["checkpoint"], ft_cfg.data.path, [(size, window), (size * 4 // 3, window * 4 // 3)])
    from simmim.export import export

    exported = export(ft["checkpoint"], "safetensors", out / "export" / f"{ft_cfg.model.name}_digits.safetensors",
                      overwrite=True)
    images = sorted((out / "pretrain" / "images").glob("*.png"))
    return DemoResult(pre, ft, format_table(rows), exported, baseline, {
        "tensorboard": f"tensorboard --logdir {out}",
        "reconstruction": str(images[-1]) if images else "",
    }, configs={"pretrain": pre_cfg, "finetune": ft_cfg})


def summary(result: DemoResult) -> str:
    """The short report ``simmim demo`` prints: every figure is what the runs read and measured."""
    pre, ft = result.pretrain, result.finetune
    p, f = result.configs["pretrain"], result.configs["finetune"]
    windows = "/".join(str(w) for w in ft["pretrained_windows"])
    lines = [
        "simmim demo: SimMIM pretraining -> fine-tuning at a new size/window -> evaluation -> export",
        f"  pretrain  {p.model.name} {p.model.img_size}px W{p.model.window_size}, {pre['steps']} steps on "
        f"{p.data.path}: masked L1 {pre['first_loss']:.3f} -> {pre['last_loss']:.3f}",
        f"  finetune  {f.model.img_size}px W{f.model.window_size} (pretrained windows {windows} read from "
        f"{Path(pre['checkpoint']).name}), {ft['steps']} steps on {f.data.path}: "
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
