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
from simmim.run_dir import MANIFEST_NAME, Manifest

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


DEMO_NAMES = ("pretrain", "finetune", "finetune-scratch", "export")  # what the demo writes in its folder


def run_demo(output: str | Path = "runs/demo", pretrain_steps: int = 300, finetune_epochs: int = 4,
             compare: bool = False, extra: list[str] | None = None) -> DemoResult:
    """Pretrain -> fine-tune -> evaluate -> export under ``output``. ``compare`` also fine-tunes from scratch with
    the same budget, to see what pretraining bought. ``extra`` are overrides applied to both configs' ``run``.

    The demo follows the run directory's rule (:mod:`simmim.run_dir`): ``output``'s manifest lists what it wrote,
    and a later demo replaces only that (each run its own listed files, the export its files). Other files in
    ``output`` are left alone; one with a name the demo writes that no manifest lists is refused, naming it."""
    out = Path(output)
    # both configs are loaded (and checked) before anything runs: a bad epoch count fails now, not after pretraining
    shared = [f"run.{o}" for o in (extra or [])]
    pre_cfg = load_config(PretrainConfig, resolve("demo/pretrain"),
                          [f"run.output={out / 'pretrain'}", f"schedule.max_steps={pretrain_steps}", *shared])
    ft_args = [f"schedule.epochs={finetune_epochs}", *shared]
    base_cfg = load_config(FinetuneConfig, resolve("demo/finetune"), [f"run.output={out / 'finetune-scratch'}",
                                                                        *ft_args])
    manifest = Manifest.read(out) or Manifest(out)
    foreign = [f"{n}/" for n in DEMO_NAMES if (out / n).exists() and not manifest.owns(n)]
    if foreign:
        raise UserError(f"{out} holds {', '.join(foreign)}, which simmim demo did not write (no {MANIFEST_NAME} "
                        "lists them); move them away or pass another --output (nothing was changed)")
    out.mkdir(parents=True, exist_ok=True)
    manifest.add([], [out / n for n in DEMO_NAMES if n != "finetune-scratch" or compare])
    pre = pretrain.run(pre_cfg, overwrite=True)

    ft_cfg = replace(base_cfg, **{"pretrained": pre["checkpoint"], "run.output": str(out / "finetune")})
    ft = finetune.run(ft_cfg, overwrite=True)
    baseline = finetune.run(base_cfg, overwrite=True) if compare else None

    size, window = ft_cfg.model.img_size, ft_cfg.model.window_size
    rows = evaluate_checkpoint(ft["checkpoint"], ft_cfg.data.path, [(size, window), (size * 4 // 3, window * 4 // 3)])
    from simmim.export import export

    target = out / "export" / f"{ft_cfg.model.name}_digits.safetensors"
    manifest.add([target, target.with_name(target.name + ".json")])  # the weights and their card
    exported = export(ft["checkpoint"], "safetensors", target, overwrite=True)
    manifest.add(exported)
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
