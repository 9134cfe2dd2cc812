"""Label efficiency of SimMIM pretraining at CPU scale: does masked-image pretraining on an unlabelled pool make the
labels go further? Results and their reading: docs/label_efficiency.md.

On the position-bias study's task (digits over photographs, ``position_bias_task.py``), one small SwinV2 is
pretrained once with SimMIM on the unlabelled pool (every training scene, labels unused), saving encoder snapshots
along the way. Then, for each label fraction (1, 5, 10, 25, 100% of the pool, class-balanced subsets, one per seed)
and seed, it is fine-tuned from the final snapshot and, with the same recipe and budget, trained from random
initialisation; both are tested on fixed held-out scenes. Each snapshot's frozen encoder is also scored by k-NN and
a linear probe (does the representation improve as pretraining goes on?), and at some fractions every fine-tuned
model continues the seed's three-stage path: a short fine-tune at a larger image and window (SimMIM -> supervised on
the labelled part -> new size).

    python tools/label_efficiency.py --out docs/label_efficiency       # the full study (2 processes x 1 thread)
    python tools/label_efficiency.py --quick --out /tmp/le             # a few steps: the plumbing only

Writes ``results.json`` (every run, probe and the pretraining loss), ``tables.md`` (mean +- std over seeds) and
``label_efficiency.png`` into ``--out``.
"""

from __future__ import annotations

import os

# see position_bias_study.py: idle OpenMP threads sleep instead of spinning (set before torch starts its pool)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import multiprocessing
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling modules import plainly

from line_plot import PALETTE, Panel, Series, plot_panels  # noqa: E402
from position_bias_study import Budget as PositionBiasBudget  # noqa: E402
from position_bias_study import accuracy, normalise, train  # noqa: E402
from position_bias_task import digit_split, draw_layouts, render  # noqa: E402

from simmim import SimMIM  # noqa: E402
from simmim.data import MaskGenerator  # noqa: E402
from simmim.evaluate import at_size  # noqa: E402
from simmim.models import SwinTransformerV2, create_model  # noqa: E402
from simmim.monitor import extract_features, knn_accuracy, linear_probe_accuracy  # noqa: E402
from simmim.optim import build_optimizer, build_scheduler, param_groups  # noqa: E402

INITS = ("SimMIM", "random")  # the two starting points of every fine-tune
_PB = PositionBiasBudget()


@dataclass(frozen=True)
class Budget:
    # the position-bias study's model (swinv2_pico cut to 3 stages) at half its size: 32 px / W4 gives windows
    # 4/4/2. At 64 px a pilot stayed at chance after 100 steps of all 3200 labels where 32 px reached 25% (41% at
    # 200, 57% at 300), at 0.4x the CPU time per step: 64 px needs more steps than 30 fine-tunes can have here.
    model: str = _PB.model
    depths: tuple[int, ...] = _PB.depths
    num_heads: tuple[int, ...] = _PB.num_heads
    img_size: int = 32
    window_size: int = 4
    pool_scenes: int = 3200  # the unlabelled pool; its labels, all or a fraction, are the labelled set
    test_scenes: int = 720  # 2 scenes for each of the 360 held-out digits
    fractions: tuple[float, ...] = (0.01, 0.05, 0.10, 0.25, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)  # fine-tuning seeds: label subset, head / random init and batch order
    # SimMIM pretraining, once
    pretrain_seed: int = 0
    pretrain_steps: int = 1000  # 10 passes over the pool
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 50
    mask_patch_size: int = 8  # 4x4 cells of 8 px at 32 px (the paper: 6x6 cells of 32 px at 192 px)
    mask_ratio: float = 0.6
    snapshots: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)  # where the encoder is saved, as fractions of the steps
    # fine-tuning: one recipe for both inits and every fraction (the position-bias study's, which trains this
    # model from scratch); the names below are the ones position_bias_study.train reads
    steps: int = 300  # 3 passes over 100% of the labels, 300 over 1%
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    table_lr_scale: float = 1.0
    # the three-stage path: the fine-tuned models of these fractions continue at a larger size
    stage3_fractions: tuple[float, ...] = (0.10, 1.0)
    stage3_size: tuple[int, int] = (48, 6)  # image and window x1.5: windows 6/6/3
    stage3_steps: int = 15
    stage3_lr: float = 5e-4
    eval_batch: int = 128
    knn_k: int = 20


QUICK = Budget(pool_scenes=100, test_scenes=20, fractions=(0.1, 1.0), seeds=(0, 1), pretrain_steps=4, pretrain_warmup=1,
               steps=3, batch_size=8, warmup_steps=1, stage3_fractions=(0.1,), stage3_steps=2, eval_batch=20)


def fraction_name(f: float) -> str:
    return f"{100 * f:g}%"


def label_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a class-balanced ``fraction`` of ``labels`` (N,), sorted: ``round(fraction * N)`` images, as
    evenly spread over the classes as the classes allow (at least one each). Subsets of one seed are nested: a
    larger fraction keeps the images of a smaller one."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    classes = np.unique(y)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in classes]  # a seeded order within each class
    n = max(round(fraction * len(y)), len(classes))
    take = [0] * len(classes)
    turn = rng.permutation(len(classes))  # which classes get the remainder: a seeded choice, not the low digits
    i = 0
    while sum(take) < n:  # round-robin over the classes that still have images: balanced, exactly n
        c = turn[i % len(classes)]
        take[c] += take[c] < len(per_class[c])
        i += 1
    return torch.from_numpy(np.sort(np.concatenate([p[:k] for p, k in zip(per_class, take, strict=True)])))


def new_encoder(budget: Budget, seed: int, num_classes: int) -> SwinTransformerV2:
    """The study's SwinV2, initialised from ``seed`` (the same weights whatever ``num_classes``, head aside)."""
    torch.manual_seed(seed)
    return create_model(budget.model, img_size=budget.img_size, window_size=budget.window_size, depths=budget.depths,
                        num_heads=budget.num_heads, num_classes=num_classes, drop_path_rate=0.0)


# ----------------------------------------------------------------------------------------------------------------
# the data, rendered once in the parent; worker processes inherit it (fork)

DATA: dict[str, torch.Tensor] = {}
PROGRESS: list[Path] = []  # results are also appended here as they come (an interrupted study keeps them)


def log_progress(record: dict) -> None:
    if PROGRESS:
        with PROGRESS[0].open("a") as f:
            f.write(json.dumps(record) + "\n")


def prepare_data(budget: Budget) -> None:
    """Render the pool (training views: random magnified crops, as in the position-bias study), the test scenes,
    and both again at the three-stage size, into :data:`DATA`."""
    pool = draw_layouts(digit_split("train"), budget.pool_scenes, seed=0, zoom=True)
    test = draw_layouts(digit_split("val"), budget.test_scenes, seed=1)
    DATA["pool"], DATA["pool_labels"] = render(pool, budget.img_size)
    DATA["test"], DATA["test_labels"] = render(test, budget.img_size)
    if budget.stage3_fractions:
        DATA["pool3"] = render(pool, budget.stage3_size[0])[0]
        DATA["test3"] = render(test, budget.stage3_size[0])[0]


# ----------------------------------------------------------------------------------------------------------------
# the jobs: each a pure function of its arguments and DATA, so any process can run any of them


def snapshot_steps(budget: Budget) -> list[int]:
    return sorted({round(f * budget.pretrain_steps) for f in budget.snapshots})


def pretrain(budget: Budget) -> dict:
    """SimMIM on the pool's images (labels unused). Returns encoder state dicts at :func:`snapshot_steps` (step 0 is
    the initialisation; without SimMIM's ``mask_token``) and the loss of every step."""
    images = DATA["pool"]  # (N, 3, H, W) uint8
    model = SimMIM(new_encoder(budget, budget.pretrain_seed, num_classes=0))
    opt = build_optimizer(param_groups(model, budget.weight_decay), lr=budget.pretrain_lr, betas=(0.9, 0.999),
                          eps=1e-8)
    lr = budget.pretrain_lr
    sched = build_scheduler(opt, "cosine", budget.pretrain_steps, budget.pretrain_warmup, warmup_lr=lr / 100,
                            min_lr=lr / 100)
    masks = MaskGenerator(budget.img_size, budget.mask_patch_size, model.patch_size, budget.mask_ratio)
    rng = np.random.default_rng(budget.pretrain_seed)
    gen = torch.Generator().manual_seed(budget.pretrain_seed)
    order = torch.cat([torch.randperm(len(images), generator=gen)
                       for _ in range(-(-budget.pretrain_steps * budget.batch_size // len(images)))])
    keep = snapshot_steps(budget)
    snaps, losses = {}, []
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for step in range(budget.pretrain_steps + 1):
        if step in keep:  # before the update of this step: snapshot 0 is the initialisation
            # the encoder as a classifier uses it: SimMIM's mask_token is only for masked inputs
            snaps[step] = {k: v.clone() for k, v in model.encoder.state_dict().items() if k != "mask_token"}
        if step == budget.pretrain_steps:
            break
        sched.step_update(step)
        idx = order[step * budget.batch_size:(step + 1) * budget.batch_size]
        mask = torch.stack([masks(rng) for _ in idx])  # (B, h, w), True = masked
        loss = model(normalise(images[idx]), mask).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite SimMIM loss at step {step}; lower pretrain_lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
    seconds = round(time.perf_counter() - t0, 1)
    print(f"SimMIM pretraining: {budget.pretrain_steps} steps in {seconds:.0f} s, loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}", flush=True)
    return dict(snapshots=snaps, losses=losses, seconds=seconds, cpu_s=round(time.process_time() - c0, 1))


@torch.no_grad()
def features(encoder: SwinTransformerV2, images: torch.Tensor, labels: torch.Tensor, batch: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled, normed last-stage features (N, C) of uint8 images (N, 3, H, W), through the library's extractor."""
    batches = [dict(image=normalise(images[i:i + batch]), label=labels[i:i + batch])
               for i in range(0, len(labels), batch)]
    return extract_features(encoder, batches)  # type: ignore[arg-type]  (any iterable of batches)


def probe(budget: Budget, step: int, state: dict) -> dict:
    """k-NN and linear-probe top-1 (%) of a frozen snapshot: fitted on the whole labelled pool, scored on the test
    scenes (the library's ``simmim.monitor`` classifiers)."""
    c0 = time.process_time()
    encoder = new_encoder(budget, budget.pretrain_seed, num_classes=0)
    encoder.load_state_dict(state)
    tx, ty = features(encoder, DATA["pool"], DATA["pool_labels"], budget.eval_batch)
    vx, vy = features(encoder, DATA["test"], DATA["test_labels"], budget.eval_batch)
    out = dict(step=step, knn_top1=100 * knn_accuracy(tx, ty, vx, vy, budget.knn_k),
               linear_probe_top1=100 * linear_probe_accuracy(tx, ty, vx, vy), cpu_s=round(time.process_time() - c0, 1))
    log_progress(out)
    print(f"probe at SimMIM step {step}: k-NN {out['knn_top1']:.1f}, linear {out['linear_probe_top1']:.1f}", flush=True)
    return out


def init_classifier(budget: Budget, init: str, seed: int, encoder_state: dict | None) -> SwinTransformerV2:
    """A 10-class model: the pretrained encoder (``encoder_state``) or a random one of ``seed``, with a fresh head of
    ``seed`` either way."""
    model = new_encoder(budget, seed, num_classes=10)
    if init == "SimMIM":
        missing, unexpected = model.load_state_dict(encoder_state, strict=False)  # type: ignore[arg-type]
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise RuntimeError(f"encoder state does not fit: missing {missing}, unexpected {unexpected}")
    return model


def finetune(budget: Budget, init: str, fraction: float, seed: int, encoder_state: dict | None) -> list[dict]:
    """Fine-tune one (init, fraction, seed) on its label subset and test it; at the three-stage fractions, then move
    it to the larger size, test directly and after a short fine-tune there. One row per test."""
    subset = label_subset(DATA["pool_labels"], fraction, seed)
    model = init_classifier(budget, init, seed, encoder_state)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = train(model, DATA["pool"][subset], DATA["pool_labels"][subset], budget.steps, budget.lr, budget, seed)
    base = dict(init=init, fraction=fraction, seed=seed, labels=len(subset), train_loss=round(loss, 4),
                train_s=round(time.perf_counter() - t0, 1))
    rows = [dict(base, stage="fine-tune", setting=f"{budget.img_size}/W{budget.window_size}",
                 top1=accuracy(model, DATA["test"], DATA["test_labels"], budget.eval_batch))]
    if fraction in budget.stage3_fractions:
        img, win = budget.stage3_size
        moved = at_size(model, img, win)
        rows.append(dict(base, stage="direct", setting=f"{img}/W{win}",
                         top1=accuracy(moved, DATA["test3"], DATA["test_labels"], budget.eval_batch)))
        train(moved, DATA["pool3"][subset], DATA["pool_labels"][subset], budget.stage3_steps, budget.stage3_lr,
              budget, seed)
        rows.append(dict(base, stage="three-stage", setting=f"{img}/W{win}",
                         top1=accuracy(moved, DATA["test3"], DATA["test_labels"], budget.eval_batch)))
    for r in rows:  # the job's CPU time, every stage included (a shared machine stretches the wall time, not this)
        r["cpu_s"] = round(time.process_time() - c0, 1)
        log_progress(r)
    print(f"{init:6s} {fraction_name(fraction):>4s} seed {seed}: trained in {base['train_s']:5.1f} s, "
          + "  ".join(f"{r['stage']} {r['setting']} {r['top1']:.1f}" for r in rows), flush=True)
    return rows


def _init_worker(data: dict[str, torch.Tensor]) -> None:
    """A spawned worker starts empty: it gets the rendered scenes of :data:`DATA` from the parent."""
    DATA.update(data)


def _in_worker(job: tuple) -> object:
    torch.set_num_threads(1)
    fn, *args = job
    return fn(*args)


# ----------------------------------------------------------------------------------------------------------------
# tables and plot


def summarise(rows: list[dict], init: str, fraction: float, stage: str = "fine-tune") -> tuple[float, float, int]:
    """(mean, std, n) of top-1 over seeds; NaN when absent, std NaN with one seed."""
    vals = [r["top1"] for r in rows if r["init"] == init and r["fraction"] == fraction and r["stage"] == stage]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan, len(vals)


def cell(rows: list[dict], init: str, fraction: float, stage: str = "fine-tune") -> str:
    mean, std, n = summarise(rows, init, fraction, stage)
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def tables(rows: list[dict], probes: list[dict], budget: Budget) -> str:
    """Markdown: top-1 per fraction and init; the probes per pretraining step; the three-stage path."""
    labels = {r["fraction"]: r["labels"] for r in rows}
    fr = list(budget.fractions)
    seeds = sorted({r["seed"] for r in rows})
    out = [f"**Table 1.** Fine-tuned at {budget.img_size} px / W{budget.window_size} with a fraction of the "
           f"{budget.pool_scenes} pool labels ({budget.steps} steps of {budget.batch_size} for every fraction).\n",
           "| init | " + " | ".join(f"{fraction_name(f)} ({labels.get(f, '?')} labels)" for f in fr) + " |",
           "| --- " * (len(fr) + 1) + "|"]
    out += [f"| {init} | " + " | ".join(cell(rows, init, f) for f in fr) + " |" for init in INITS]
    out.append("| SimMIM - random | " + " | ".join(
        f"{summarise(rows, 'SimMIM', f)[0] - summarise(rows, 'random', f)[0]:+.1f}" for f in fr) + " |")
    out += ["", f"**Table 2.** The pretrained encoder, frozen, at several points of its {budget.pretrain_steps} "
            f"SimMIM steps (step 0 = random init): k-NN (k={budget.knn_k}) and linear-probe top-1, fitted on all "
            f"{budget.pool_scenes} pool labels.\n",
            "| pretraining step | " + " | ".join(str(p["step"]) for p in probes) + " |",
            "| --- " * (len(probes) + 1) + "|",
            "| k-NN | " + " | ".join(f"{p['knn_top1']:.1f}" for p in probes) + " |",
            "| linear probe | " + " | ".join(f"{p['linear_probe_top1']:.1f}" for p in probes) + " |"]
    if budget.stage3_fractions:
        img, win = budget.stage3_size
        out += ["", f"**Table 3.** The three-stage path: the Table 1 models moved to {img} px / W{win}, tested "
                f"directly and after {budget.stage3_steps} steps there on the same labels.\n",
                f"| init | labels | {budget.img_size} px (Table 1) | {img} px, direct | {img} px, three-stage |",
                "| --- | --- | --- | --- | --- |"]
        for f in budget.stage3_fractions:
            out += [f"| {init} | {fraction_name(f)} | {cell(rows, init, f)} | {cell(rows, init, f, 'direct')} | "
                    f"{cell(rows, init, f, 'three-stage')} |" for init in INITS]
    out += ["", f"Top-1 accuracy (%) on {budget.test_scenes} held-out test scenes; fine-tunes: mean ± std over "
            f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); probes: the one pretraining run."]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], probes: list[dict], budget: Budget, path: Path) -> Path:
    """(a) top-1 against the label fraction (log x), one line per init, +-1 std bars; (b) the probes against the
    pretraining step."""
    fr = list(budget.fractions)
    series = []
    for k, init in enumerate(INITS):
        stats = [summarise(rows, init, f) for f in fr]
        series.append(Series(f"fine-tuned from {init} init" if init == "random" else "fine-tuned from SimMIM",
                             [m for m, _, _ in stats], [s for _, s, _ in stats], PALETTE[k]))
    a = Panel("(a) top-1 against labels used", [fraction_name(f) for f in fr], series, x_values=[100 * f for f in fr],
              log_x=True, x_label="fraction of the pool's labels (log)")
    steps = [p["step"] for p in probes]
    nan = [math.nan] * len(probes)
    b = Panel("(b) frozen encoder during pretraining", [str(s) for s in steps],
              [Series("k-NN (k=20)", [p["knn_top1"] for p in probes], nan, PALETTE[2]),
               Series("linear probe", [p["linear_probe_top1"] for p in probes], nan, PALETTE[3])],
              x_values=[float(s) for s in steps], x_label="SimMIM step (0 = random init)")
    seeds = len({r["seed"] for r in rows})
    return plot_panels([a, b], path, caption=f"{budget.test_scenes} test scenes; (a) mean ± std over {seeds} seeds, "
                                             "one recipe for both inits; (b) one pretraining run, probes on all labels")


# ----------------------------------------------------------------------------------------------------------------


def run_jobs(budget: Budget, workers: int) -> tuple[dict, list[dict], list[dict]]:
    """Pretraining, probes and fine-tunes over ``workers`` processes (1: in this process). The first seed's
    random-init fine-tunes need no pretraining, so they run beside it; then seed by seed, so that an interrupted
    study (see ``progress.jsonl``) has both inits at some seeds."""
    first = [(finetune, budget, "random", f, budget.seeds[0], None) for f in budget.fractions]

    def after(pre: dict) -> list[tuple]:
        final = pre["snapshots"][budget.pretrain_steps]
        jobs = [(finetune, budget, "SimMIM", f, budget.seeds[0], final) for f in budget.fractions]
        jobs += [(probe, budget, step, state) for step, state in pre["snapshots"].items()]
        for s in budget.seeds[1:]:
            jobs += [(finetune, budget, init, f, s, final if init == "SimMIM" else None)
                     for init in reversed(INITS) for f in budget.fractions]
        return jobs

    if workers == 1:
        pre = pretrain(budget)
        results = [fn(*args) for fn, *args in first]
        results += [fn(*args) for fn, *args in after(pre)]
    else:
        # spawn, not fork: a process whose autograd threads already ran (a test worker, a notebook) cannot fork
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (dict(DATA),)) as pool:
            pre_async = pool.apply_async(_in_worker, ((pretrain, budget),))
            first_async = [pool.apply_async(_in_worker, (job,)) for job in first]
            pre = pre_async.get()
            rest = pool.map(_in_worker, after(pre), chunksize=1)
            results = [r.get() for r in first_async] + rest
    probes = [r for r in results if isinstance(r, dict)]
    return pre, probes, [row for r in results if isinstance(r, list) for row in r]


def cpu_model() -> str:
    """The processor's name as lscpu shows it (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/label_efficiency", help="folder for results.json, tables.md and the PNG")
    ap.add_argument("--quick", action="store_true", help="a few steps and scenes: checks the plumbing only")
    ap.add_argument("--workers", type=int, default=2, help="processes of one torch thread each (1: this process)")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the fine-tuning seeds (default 0 1 2; quick 0)")
    ap.add_argument("--steps", type=int, help="override the fine-tuning steps")
    ap.add_argument("--pretrain-steps", type=int, help="override the SimMIM steps")
    args = ap.parse_args(argv)

    budget = QUICK if args.quick else Budget()
    if args.seeds:
        budget = replace(budget, seeds=tuple(args.seeds))
    if args.steps:
        budget = replace(budget, steps=args.steps)
    if args.pretrain_steps:
        budget = replace(budget, pretrain_steps=args.pretrain_steps)
    torch.set_num_threads(1)  # the workers each take one; the parent only renders and writes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    PROGRESS[:] = [out / "progress.jsonl"]
    PROGRESS[0].write_text("")

    t0, c0 = time.perf_counter(), time.process_time()
    prepare_data(budget)
    render_s = time.perf_counter() - t0
    pre, probes, rows = run_jobs(budget, args.workers)
    probes.sort(key=lambda p: p["step"])
    rows.sort(key=lambda r: (r["init"], r["fraction"], r["seed"]))
    wall = time.perf_counter() - t0

    meta = dict(budget=asdict(budget), workers=args.workers, wall_s=round(wall, 1), render_s=round(render_s, 1),
                pretrain_s=pre["seconds"], pretrain_cpu_s=pre["cpu_s"],
                jobs_cpu_s=round(pre["cpu_s"] + sum(p["cpu_s"] for p in probes) + sum(
                    {(r["init"], r["fraction"], r["seed"]): r["cpu_s"] for r in rows}.values()), 1),
                parent_cpu_s=round(time.process_time() - c0, 1), torch=torch.__version__,
                python=platform.python_version(), cpu=cpu_model(), cpus=os.cpu_count(),
                argv=sys.argv[1:] if argv is None else argv)
    losses = pre["losses"]
    result = dict(meta=meta, pretrain_loss=[round(v, 5) for v in losses], probes=probes, rows=rows)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "tables.md").write_text(tables(rows, probes, budget))
    plot(rows, probes, budget, out / "label_efficiency.png")
    print((out / "tables.md").read_text())
    first, last = losses[:max(len(losses) // 10, 1)], losses[-max(len(losses) // 10, 1):]
    print(f"SimMIM loss {statistics.fmean(first):.3f} -> {statistics.fmean(last):.3f} in {pre['seconds']:.0f} s; "
          f"wall time {wall / 60:.1f} min ({args.workers} workers), CPU time of the jobs {meta['jobs_cpu_s'] / 60:.1f} "
          f"min + {meta['parent_cpu_s'] / 60:.1f} min in the parent; wrote {out}/results.json, tables.md, "
          "label_efficiency.png")
    return dict(result, snapshots=pre["snapshots"])


if __name__ == "__main__":
    main()
