"""The SwinV2 paper's position-bias and normalisation ablations (arXiv 2111.09883, Table 1 and the res-post-norm /
cosine-attention ablation), reproduced at CPU scale. Results and their reading: docs/position_bias.md.

The same small SwinV2 is trained with log-spaced CPB, linear CPB and the V1 parameter table (and, for the ablation,
with pre-norm and/or dot-product attention) on identical data with identical budgets and seeds, at 64 px / window 4
(the paper trains Swin-T at 256 px / W8; in both, the last stage is one window and the first has 1/8 of the token
grid per window side). Each trained model is then tested without re-training
- at the trained size,
- at 64 px with windows 8 and 16 (only the window changes),
- at 96 px / W6 and 128 px / W8 (image and window x1.5 and x2: the paper's 384/W12 and 512/W16),
and, the paper's second setting, after a short fine-tune at 96/W6 and 128/W8. Moving a model keeps the CPB
coordinates normalised by the trained windows and resizes the V1 table bicubically (``set_input_size``).

    python tools/position_bias_study.py --out docs/position_bias          # the full study (2 threads)
    python tools/position_bias_study.py --quick --out /tmp/pb             # a few steps: the plumbing only

Writes ``results.json`` (every run and test), ``tables.md`` (the paper's layout, mean +- std over seeds) and
``position_bias.png`` into ``--out``. The task is described in ``position_bias_task.py``.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine a spinning second thread made training
# steps over 10x slower whenever another process held a core. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling modules import plainly

from line_plot import PALETTE, Panel, Series, plot_panels  # noqa: E402
from position_bias_task import Layout, digit_split, draw_layouts, render  # noqa: E402

from simmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from simmim.evaluate import at_size  # noqa: E402
from simmim.models import SwinTransformerV2, create_model  # noqa: E402
from simmim.optim import build_optimizer, build_scheduler, param_groups  # noqa: E402

TRAIN = (64, 4)  # (img_size, window_size) the models are trained at; stage windows 4/4/4
WINDOW_SWEEP = [(64, 4), (64, 8), (64, 16)]  # the window alone changes: stage windows 8/8/4, 16/8/4
# image and window grow together, the paper's 256/W8 -> 384/W12 -> 512/W16; larger sizes cost too much CPU time
# (attention over 100-token windows of 8-channel heads is dominated by elementwise work)
RESOLUTION_SWEEP = [(64, 4), (96, 6), (128, 8)]
FINETUNE = [(96, 6), (128, 8)]  # the paper's second setting: a short fine-tune at the larger sizes


@dataclass(frozen=True)
class Variant:
    name: str
    position_bias: str = "log_cpb"
    attention: str = "cosine"
    norm_placement: str = "res_post"


LOG_CPB = Variant("log-CPB")
POSITION_BIAS = [LOG_CPB, Variant("linear CPB", position_bias="linear_cpb"), Variant("V1 table", position_bias="table")]
# the paper's ablation adds res-post-norm, then scaled cosine attention, to a pre-norm dot-product Swin;
# the position bias is log-CPB throughout, so the last row is the log-CPB model above
ABLATION = [Variant("pre-norm, dot", attention="dot", norm_placement="pre"),
            Variant("res-post-norm, dot", attention="dot"), LOG_CPB]


@dataclass(frozen=True)
class Budget:
    # swinv2_pico cut to 3 stages (deeper third stage, head dim 8): at 64 px its stages are 16/8/4 tokens, so W4
    # gives windows 4/4/4 with the last stage one window, as Swin-T at 256 px / W8 (64/32/16/8, windows 8/8/8/8).
    # The 4-stage pico would have a 2x2 last stage whose position bias never sees an offset beyond 1.
    model: str = "swinv2_pico"
    depths: tuple[int, ...] = (2, 2, 4)
    num_heads: tuple[int, ...] = (2, 4, 8)
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3  # at 3e-3 the pre-norm / dot-product model stayed at chance in a pilot; 2e-3 trains them all
    warmup_steps: int = 60
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    train_scenes: int = 9600  # one fixed pool for every variant and seed (2 epochs at 600 x 32)
    val_scenes: int = 720  # 2 scenes for each of the 360 validation digits
    seeds: tuple[int, ...] = (0, 1, 2)
    finetune_steps: int = 20
    finetune_lr: float = 5e-4
    eval_batch: int = 128
    table_lr_scale: float = 1.0  # lr multiplier of the V1 tables (their entries are the bias itself, unlike CPB)


QUICK = Budget(steps=3, batch_size=8, warmup_steps=1, train_scenes=24, val_scenes=12, seeds=(0, 1),
               finetune_steps=2, eval_batch=12)


def setting_name(img: int, win: int) -> str:
    return f"{img}/W{win}"


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def optimizer_groups(model: SwinTransformerV2, budget: Budget) -> list[dict]:
    """The library's AdamW groups, with the V1 tables split off at ``budget.table_lr_scale``."""
    groups = param_groups(model, budget.weight_decay)
    if budget.table_lr_scale == 1.0:
        return groups
    table = {n: p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}
    for g in groups:
        keep = [i for i, n in enumerate(g["names"]) if n not in table]
        g["params"], g["names"] = [g["params"][i] for i in keep], [g["names"][i] for i in keep]
    groups = [g for g in groups if g["params"]]
    if table:
        groups.append(dict(params=list(table.values()), names=list(table), weight_decay=0.0,
                           lr_scale=budget.table_lr_scale))
    return groups


def train(model: SwinTransformerV2, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float,
          budget: Budget, seed: int) -> float:
    """AdamW + warmup/cosine on (images (N, 3, H, W) uint8, labels (N,)), batches in a seeded order. Returns the
    mean loss of the last 10% of steps."""
    opt = build_optimizer(optimizer_groups(model, budget), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = min(budget.warmup_steps, steps // 4)
    sched = build_scheduler(opt, "cosine", steps, warmup, warmup_lr=lr / 100, min_lr=lr / 100)
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(labels), generator=gen)
                       for _ in range(-(-steps * budget.batch_size // len(labels)))])
    model.train()
    losses = []
    for step in range(steps):
        sched.step_update(step)
        idx = order[step * budget.batch_size:(step + 1) * budget.batch_size]
        loss = F.cross_entropy(model(normalise(images[idx])), labels[idx], label_smoothing=budget.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
    tail = losses[-max(len(losses) // 10, 1):]
    return sum(tail) / len(tail)


@torch.no_grad()
def accuracy(model: SwinTransformerV2, images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    """Top-1 accuracy (%) of ``model`` on uint8 images (N, 3, H, W)."""
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        correct += (model(normalise(images[i:i + batch])).argmax(-1) == labels[i:i + batch]).sum().item()
    return 100.0 * correct / len(labels)


class Scenes:
    """The study's data: a fixed training pool and validation scenes, rendered once per size and cached."""

    def __init__(self, budget: Budget) -> None:
        self.train_layouts: list[Layout] = draw_layouts(digit_split("train"), budget.train_scenes, seed=0,
                                                           zoom=True)
        self.val_layouts: list[Layout] = draw_layouts(digit_split("val"), budget.val_scenes, seed=1)
        self.finetune_scenes = budget.finetune_steps * budget.batch_size
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def train_set(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool at the training size, or its first ``finetune_steps x batch`` scenes at a fine-tuning size."""
        layouts = self.train_layouts if size == TRAIN[0] else self.train_layouts[:self.finetune_scenes]
        return self._get("train", size, layouts)

    def val_set(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._get("val", size, self.val_layouts)

    def _get(self, split: str, size: int, layouts: list[Layout]) -> tuple[torch.Tensor, torch.Tensor]:
        if (split, size) not in self._cache:
            self._cache[(split, size)] = render(layouts, size)
        return self._cache[(split, size)]


def run_variant(variant: Variant, seed: int, scenes: Scenes, budget: Budget, finetune: bool) -> list[dict]:
    """Train one (variant, seed) at :data:`TRAIN` and test it everywhere; one row per test."""
    torch.manual_seed(seed)
    model = create_model(budget.model, img_size=TRAIN[0], window_size=TRAIN[1], depths=budget.depths,
                         num_heads=budget.num_heads, num_classes=10, drop_path_rate=0.0,
                         position_bias=variant.position_bias, attention=variant.attention,
                         norm_placement=variant.norm_placement)
    images, labels = scenes.train_set(TRAIN[0])  # rendered on first use: not part of the training time
    t0 = time.perf_counter()
    loss = train(model, images, labels, budget.steps, budget.lr, budget, seed)
    train_s = time.perf_counter() - t0
    base = dict(variant=variant.name, seed=seed, train_loss=loss, train_s=round(train_s, 1))
    rows = []
    for img, win in dict.fromkeys(WINDOW_SWEEP + RESOLUTION_SWEEP):  # ordered, without repeats
        moved = model if (img, win) == TRAIN else at_size(model, img, win)
        acc = accuracy(moved, *scenes.val_set(img), budget.eval_batch)
        rows.append(dict(base, setting=setting_name(img, win), finetuned=False, top1=acc,
                         stage_windows="/".join(str(w[0]) for w in moved.effective_window_sizes)))
    if finetune:
        for img, win in FINETUNE:
            moved = at_size(model, img, win)
            train(moved, *scenes.train_set(img), budget.finetune_steps, budget.finetune_lr, budget, seed)
            acc = accuracy(moved, *scenes.val_set(img), budget.eval_batch)
            rows.append(dict(base, setting=setting_name(img, win), finetuned=True, top1=acc,
                             stage_windows="/".join(str(w[0]) for w in moved.effective_window_sizes)))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# tables and plot


def summarise(rows: list[dict], variant: str, setting: tuple[int, int], finetuned: bool = False) -> tuple[float, float]:
    """(mean, std over seeds) of top-1 for one variant and test; NaN when absent, std NaN with one seed."""
    vals = [r["top1"] for r in rows if r["variant"] == variant and r["setting"] == setting_name(*setting)
            and r["finetuned"] == finetuned]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan


def cell(rows: list[dict], variant: str, setting: tuple[int, int], finetuned: bool = False) -> str:
    mean, std = summarise(rows, variant, setting, finetuned)
    return f"{mean:.1f} ± {std:.1f}"


def ablation_label(v: Variant) -> str:
    return "res-post-norm, cosine (= log-CPB)" if v == LOG_CPB else v.name


def tables(rows: list[dict], variants: list[Variant], ablation: list[Variant] | None) -> str:
    """Markdown: Table 1 in the paper's layout (direct / fine-tuned), the window-only sweep, and the norm/attention
    ablation in the paper's layout."""
    names = [v.name for v in variants]
    bigger = [s for s in RESOLUTION_SWEEP if s != TRAIN]
    out = [f"**Table 1** (the paper's Table 1 layout). Trained at {TRAIN[0]} px / W{TRAIN[1]}; tested at larger "
           "images with proportionally larger windows directly / after a short fine-tune at that size.\n",
           f"| position bias | {TRAIN[0]} px, W{TRAIN[1]} (trained) | "
           + " | ".join(f"{i} px, W{w}: direct / fine-tuned" for i, w in bigger) + " |",
           "| --- " * (len(bigger) + 2) + "|"]
    for n in names:
        out.append(f"| {n} | {cell(rows, n, TRAIN)} | " + " | ".join(
            f"{cell(rows, n, s)} / {cell(rows, n, s, True) if s in FINETUNE else '-'}" for s in bigger) + " |")
    out += ["", f"**Table 2.** The same models at {TRAIN[0]} px: the window alone grows (no fine-tuning).\n",
            "| position bias | " + " | ".join(f"{i} px, W{w}" for i, w in WINDOW_SWEEP) + " |",
            "| --- " * (len(WINDOW_SWEEP) + 1) + "|"]
    out += [f"| {n} | " + " | ".join(cell(rows, n, s) for s in WINDOW_SWEEP) + " |" for n in names]
    if ablation:
        sweep = list(dict.fromkeys(RESOLUTION_SWEEP + WINDOW_SWEEP))
        out += ["", "**Table 3** (the paper's ablation layout). Log-CPB throughout; tested directly at other sizes.\n",
                "| backbone | res-post-norm | scaled cosine attention | "
                + " | ".join(f"{i} px, W{w}" for i, w in sweep) + " |",
                "| --- | --- | --- " + "| --- " * len(sweep) + "|"]
        for v in ablation:
            flags = ("✓" if v.norm_placement == "res_post" else "", "✓" if v.attention == "cosine" else "")
            out.append(f"| {ablation_label(v)} | {flags[0]} | {flags[1]} | "
                       + " | ".join(cell(rows, v.name, s) for s in sweep) + " |")
    seeds = sorted({r["seed"] for r in rows})
    out += ["", f"Top-1 accuracy (%) on the validation scenes, mean ± std over seeds {', '.join(map(str, seeds))}."]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], variants: list[Variant], ablation: list[Variant] | None, path: Path) -> Path:
    """Accuracy against resolution/window, one line per variant, +-1 std error bars."""
    def series(v: Variant, settings: list[tuple[int, int]], colour: tuple[int, int, int], finetuned: bool = False,
               label: str | None = None) -> Series:
        stats = [summarise(rows, v.name, s, finetuned and s != TRAIN) for s in settings]
        return Series((label or v.name) + (" fine-tuned" if finetuned else ""), [m for m, _ in stats],
                      [s for _, s in stats], colour, dashed=finetuned, hollow=finetuned)

    res_labels = [f"{i} px\nW{w}" for i, w in RESOLUTION_SWEEP]
    sweep = Panel("(a) image and window scaled together", res_labels,
                  [series(v, RESOLUTION_SWEEP, PALETTE[k]) for k, v in enumerate(variants)])
    # fine-tuned results start from the trained point; (0, 0) leaves a position without a point
    tuned = [s if s in FINETUNE or s == TRAIN else (0, 0) for s in RESOLUTION_SWEEP]
    sweep.series += [series(v, tuned, PALETTE[k], finetuned=True) for k, v in enumerate(variants)]
    window = Panel(f"(b) {TRAIN[0]} px, the window alone grows", [f"W{w}" for _, w in WINDOW_SWEEP],
                   [series(v, WINDOW_SWEEP, PALETTE[k]) for k, v in enumerate(variants)])
    panels = [sweep, window]
    if ablation:
        panels.append(Panel("(c) norm / attention ablation (log-CPB)", res_labels,
                            [series(v, RESOLUTION_SWEEP, PALETTE[3 + k], label=ablation_label(v))
                             for k, v in enumerate(ablation)]))
    seeds = len({r["seed"] for r in rows})
    return plot_panels(panels, path, caption=f"trained at {TRAIN[0]} px / W{TRAIN[1]}; mean ± std over {seeds} "
                                             "seeds; hollow markers: after a short fine-tune at that size")


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/position_bias", help="folder for results.json, tables.md and the PNG")
    ap.add_argument("--quick", action="store_true", help="a few steps and scenes: checks the plumbing only")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the study was timed with 2)")
    ap.add_argument("--no-ablation", action="store_true", help="skip the res-post-norm / cosine attention ablation")
    ap.add_argument("--no-finetune", action="store_true", help="skip the fine-tunes at the larger sizes")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the seeds (default 0 1 2; quick 0 1)")
    ap.add_argument("--steps", type=int, help="override the training steps per run")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else Budget()
    if args.seeds:
        budget = replace(budget, seeds=tuple(args.seeds))
    if args.steps:
        budget = replace(budget, steps=args.steps)
    ablation = None if args.no_ablation else ABLATION
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    scenes = Scenes(budget)
    runs = POSITION_BIAS + [v for v in (ablation or []) if v not in POSITION_BIAS]
    rows: list[dict] = []
    for seed in budget.seeds:  # seeds outermost: an interrupted study still has every variant at some seeds
        for v in runs:
            new = run_variant(v, seed, scenes, budget, finetune=v in POSITION_BIAS and not args.no_finetune)
            rows += new
            print(f"seed {seed} {v.name:20s} trained in {new[0]['train_s']:5.1f}s (loss {new[0]['train_loss']:.3f}): "
                  + "  ".join(f"{r['setting']}{'ft' if r['finetuned'] else ''} {r['top1']:.1f}" for r in new),
                  flush=True)
    wall = time.perf_counter() - t0

    meta = dict(budget=asdict(budget), threads=args.threads, wall_s=round(wall, 1), torch=torch.__version__,
                python=platform.python_version(), machine=platform.machine(), processor=platform.processor(),
                variants=[asdict(v) for v in runs], argv=sys.argv[1:] if argv is None else argv)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / "tables.md").write_text(tables(rows, POSITION_BIAS, ablation))
    plot(rows, POSITION_BIAS, ablation, out / "position_bias.png")
    print((out / "tables.md").read_text())
    print(f"wall time {wall / 60:.1f} min ({args.threads} threads); wrote {out}/results.json, tables.md, "
          "position_bias.png")
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
