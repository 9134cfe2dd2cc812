"""The ``simmim`` command line: parses arguments and dispatches to the library. Output goes to stdout here only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import RunStopped, UserError
from .threads import set_passive_wait


def _count_params(name: str, img_size: int, window_size: int) -> tuple[int, list]:
    import torch

    from simmim.models import create_encoder, family_of

    geometry = dict(img_size=img_size, window_size=window_size) if family_of(name).windowed else \
        dict(img_size=img_size)
    with torch.device("meta"):  # no memory is allocated, so even SwinV2-G is instant
        model = create_encoder(name, **geometry)
    return sum(p.numel() for p in model.parameters()), getattr(model, "effective_window_sizes", [])


def cmd_models(args: argparse.Namespace) -> int:
    """Print the encoder variants of every family with parameter counts and effective per-stage windows at the
    given size (a family without windows, ViT, shows '-')."""
    from simmim.models import FAMILIES, list_encoders
    from simmim.models.encoders import check_encoder_geometry

    names = [args.name] if args.name else list_encoders()
    if args.name and args.name not in list_encoders():
        print(f"error: unknown model {args.name!r}; choose one of: {', '.join(list_encoders())}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        family, _, _ = check_encoder_geometry(name, args.img_size, args.window_size)  # a size that does not tile
        n, windows = _count_params(name, args.img_size, args.window_size)
        v = FAMILIES[family.name].variants[name]
        depths = v.get("depths", v.get("depth"))
        rows.append(f"{name:<20} {family.name:<7} {n / 1e6:>8.1f}M  {v.get('embed_dim', '-'):>4}  "
                    f"{str(depths):<14} {str(v.get('num_heads', '-')):<18} "
                    + ("/".join(str(w[0]) for w in windows) or "-"))
    header = f"{'model':<20} {'family':<7} {'params':>9}  {'C':>4}  {'depths':<14} {'heads':<18}"
    print(f"{header} windows @ {args.img_size}px W{args.window_size}", *rows, sep="\n")
    return 0


def _run_job(args: argparse.Namespace, config_cls: type, run: Callable[..., dict],
             flags: dict[str, str]) -> tuple[int, dict | None]:
    """Load CONFIG with the command's flags (``flags``: argument -> config key) and overrides, then run it."""
    from simmim.config import load_config
    from simmim.configs import resolve

    overrides = list(args.overrides)
    overrides += [f"{key}={getattr(args, arg)}" for arg, key in flags.items() if getattr(args, arg) is not None]
    return 0, run(load_config(config_cls, resolve(args.config), overrides), overwrite=args.overwrite)


def cmd_pretrain(args: argparse.Namespace) -> int:
    """SimMIM pretraining from a config, with --data/--output/--resume and key=value overrides."""
    from simmim.config import PretrainConfig
    from simmim.pretrain import run

    code, summary = _run_job(args, PretrainConfig, run, {"data": "data.path", "output": "run.output",
                                                         "resume": "run.resume", "init": "init"})
    if summary is None or not summary["main_process"]:
        return code
    print(f"pretrained {summary['steps']} steps: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}")
    print(f"  checkpoint:  {summary['checkpoint']}")
    print(f"  tensorboard: tensorboard --logdir {summary['output']}/tensorboard")
    print(f"  images:      {summary['output']}/images")
    for name, value in summary["monitor"].items():
        print(f"  {name.removeprefix('monitor/')}: {100 * value:.2f}%")
    if summary["skipped_files"] or summary["skipped_steps"]:
        print(f"  skipped: {summary['skipped_files']} unreadable inputs, {summary['skipped_steps']} steps")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a pretrained encoder as a classifier at a new size and window."""
    from simmim.config import FinetuneConfig
    from simmim.finetune import run

    code, summary = _run_job(args, FinetuneConfig, run, {"pretrained": "pretrained", "data": "data.path",
                                                         "output": "run.output", "resume": "run.resume"})
    if summary is None or not summary["main_process"]:
        return code
    print(f"fine-tuned {summary['steps']} steps: val top-1 {summary['last_top1']:.2f} "
          f"(best {summary['best_top1']:.2f}), top-5 {summary['last_top5']:.2f}")
    print(f"  checkpoint:  {summary['checkpoint']}  (best: {summary['best_checkpoint']})")
    print(f"  tensorboard: tensorboard --logdir {summary['output']}/tensorboard")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy of a fine-tuned checkpoint (as trained, at another size, or a sweep), or k-NN / linear probes."""
    from simmim.evaluate import evaluate_checkpoint, format_table, parse_sweep, probe_checkpoint

    foreign = dict(model_name=args.model, build_size=(args.img_size, args.window_size)) if args.model else {}
    if args.knn or args.linear_probe:
        scores = probe_checkpoint(args.checkpoint, args.data, stage=args.stage, k=args.k,
                                  linear_probe=args.linear_probe, batch_size=args.batch_size,
                                  num_workers=args.num_workers, **foreign)
        for name, value in scores.items():
            if args.knn or "knn" not in name:
                print(f"{name.removeprefix('monitor/')}: {100 * value:.2f}")
        return 0
    if args.sweep:
        sizes = parse_sweep(args.sweep)
    elif args.model:  # official/timm weights: --img-size/--window-size are the geometry they are built at
        sizes = None
    elif args.img_size or args.window_size:
        if not args.img_size:
            raise UserError("--img-size and --window-size go together")
        sizes = [(args.img_size, args.window_size)]  # no window: a ViT (a Swin checkpoint refuses it)
    else:
        sizes = None
    rows = evaluate_checkpoint(args.checkpoint, args.data, sizes, split=args.split,
                               batch_size=args.batch_size, num_workers=args.num_workers, **foreign)
    print(format_table(rows))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    """Our SimMIM/SwinV2 vs SimMIM on timm's SwinV2 side by side (step, inference, memory), the input pipeline vs
    the official one, the folder index (simmim.benchmarks); tables printed, optionally JSON."""
    import json

    import torch

    from simmim.benchmarks import BenchmarkSettings, report, run

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ("inference",) if args.inference else ("train",) if args.train else ("train", "inference")
    settings = BenchmarkSettings(
        what=tuple(args.what), model=args.model, img_size=args.img_size, window_size=args.window_size,
        batch_size=args.batch_size, memory_batch_sizes=tuple(args.memory_batch_sizes), modes=modes,
        dtypes=tuple(args.dtype), rounds=args.rounds, iters=args.iters, compile=args.compile, threads=args.threads,
        device=args.device, folder=args.folder, index_files=args.index_files, compare_list=args.compare_list,
        save_dir=args.save_dir, source_images=args.source_images, shards=args.shards, parquet_files=args.parquet_files,
        first_batch_files=args.first_batch_files, first_batch_shards=args.first_batch_shards,
        memory_cap_gib=args.memory_cap, step_timeout=args.step_timeout,
        **({"contenders": tuple(args.contenders)} if args.contenders else {}))
    text, doc = report(settings, run(settings))
    print(text)
    if args.json == "-":
        print(json.dumps(doc, indent=2, default=str))
    elif args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on embedded real images, in minutes on a CPU."""
    from simmim.demo import run_demo, summary

    steps, epochs = (40, 1) if args.quick else (args.pretrain_steps, args.finetune_epochs)
    extra = [] if args.progress else ["progress=false"]
    result = run_demo(args.output, pretrain_steps=steps, finetune_epochs=epochs, compare=args.compare, extra=extra)
    if result.pretrain["main_process"]:
        print(summary(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run checkpoint's encoder or classifier for use elsewhere."""
    from simmim.export import FORMATS, export

    if args.format not in FORMATS:
        raise UserError(f"unknown format {args.format!r}; choose one of {', '.join(FORMATS)}")
    files = export(args.checkpoint, args.format, args.out, opset=args.opset, overwrite=args.overwrite,
                   img_size=args.img_size, window_size=args.window_size)
    print(f"exported {args.checkpoint} as {args.format}:")
    for path in files:
        print(f"  {path}")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Reconstruction panels of a SimMIM checkpoint on the user's images."""
    from simmim.reconstruct import reconstruct_files

    files = reconstruct_files(args.checkpoint, args.images, args.out, mask_ratio=args.mask_ratio, seed=args.seed,
                              native_size=args.native_size, overwrite=args.overwrite, norm_target=args.norm_target,
                              norm_target_window=args.norm_target_window, mask_patch_size=args.mask_patch_size,
                              img_size=args.img_size, window_size=args.window_size)
    print(f"wrote {len(files)} panel(s) to {args.out} (original | masked | reconstruction | pasted into the input)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Pictures of a checkpoint's learned position bias, its temperatures and metadata."""
    from simmim.inspection import inspect_checkpoint

    for path in inspect_checkpoint(args.checkpoint, args.out, scale=args.scale, overwrite=args.overwrite):
        print(path)
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    """The bundled recipes by name (or path), or the path of one."""
    from simmim.configs import CONFIG_DIR, resolve

    if args.name:
        path = resolve(args.name).resolve()
        if args.path:
            print(path)
        else:
            sys.stdout.write(path.read_text())
        return 0
    for path in sorted(CONFIG_DIR.glob("*/*.yaml")):
        print(path if args.path else path.relative_to(CONFIG_DIR).with_suffix(""))
    return 0


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``, else a one-line usage error naming the argument."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _run_arguments(p: argparse.ArgumentParser, recipe: str, data: str) -> None:
    """The arguments pretraining and fine-tuning share."""
    p.add_argument("config", help=f"YAML file, or a bundled recipe such as {recipe}")
    p.add_argument("--data", help=data)
    p.add_argument("--output", help="run directory (checkpoints, tensorboard, images, config.yaml, train.log)")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint in the run directory) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true", help="replace another run found in --output (its "
                   "checkpoints, logs, images and TensorBoard files are deleted)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simmim", description="SimMIM pretraining, fine-tuning and export for Swin Transformer V2.")
    parser.add_argument("--version", action="version", version=f"simmim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("models", help="list the encoder variants (SwinV2, Swin V1, ViT) with parameter counts and "
                                      "effective windows")
    p.add_argument("name", nargs="?", help="one variant (default: all)")
    p.add_argument("--img-size", type=at_least(1), default=192)
    p.add_argument("--window-size", type=at_least(1), default=12)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("pretrain", help="SimMIM pretraining on a folder of images or a datasets dataset",
                       description="SimMIM pretraining. Overrides are dotted keys: optim.base_lr=2e-4 "
                       "data.batch_size=64 model.name=swinv2_tiny. Many GPUs: accelerate launch -m simmim pretrain.")
    _run_arguments(p, "pretrain/swinv2_base_192_w12_800ep",
                   "folder of images, datasets save_to_disk folder, hf:NAME, or embedded")
    p.add_argument("--init", help="warm start from weights (a simmim checkpoint or export, an official SimMIM or "
                   "classification file, timm, a transformers directory): fresh optimizer and schedule")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a pretrained encoder as a classifier at a new size and window",
                       description="Fine-tuning. The pretrained windows of the log-CPB come from the checkpoint "
                       "(override with model.pretrained_window_sizes=[12,12,12,6]).")
    _run_arguments(p, "finetune/swinv2_base_224_w14_100ep", "ImageNet-style folder (train/<class>, val/<class>), "
                   "save_to_disk folder, hf:NAME, or embedded:digits")
    p.add_argument("--pretrained", help="checkpoint: a simmim run, an exported .safetensors, official or timm")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="accuracy of a fine-tuned checkpoint, at other sizes too; k-NN / linear probes",
                       description="Evaluate a fine-tuned checkpoint on a labelled split as trained, at another "
                       "(img size, window) (--img-size/--window-size) or over several (--sweep 256:8,384:12), "
                       "or probe any checkpoint's frozen encoder (--knn, --linear-probe).")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="labelled data (same forms as finetune --data)")
    p.add_argument("--split", default="val")
    p.add_argument("--img-size", type=at_least(1))
    p.add_argument("--window-size", type=at_least(1))
    p.add_argument("--sweep", help="IMG:WINDOW pairs, e.g. 256:8,384:12,512:16")
    p.add_argument("--knn", action="store_true", help="k-NN accuracy of pooled features (train split -> --split)")
    p.add_argument("--linear-probe", action="store_true", help="logistic-regression accuracy of pooled features")
    p.add_argument("--model", help="variant of an official/timm checkpoint (built at --img-size/--window-size; "
                   "a ViT needs no window)")
    p.add_argument("--stage", type=int, help="what --knn/--linear-probe read: a Swin's stage (default -1: the "
                   "last, normed, pooled), a ViT's block, 0-based (default depth*2//3-1: the SimMIM paper's probe, "
                   "the 8th of 12 blocks, patch tokens averaged); negative counts from the last")
    p.add_argument("--k", type=at_least(1), default=20)
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--num-workers", type=at_least(0), default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export an encoder or classifier: safetensors, timm, hf, onnx",
                       description="Export the encoder (pretraining checkpoint) or classifier (fine-tuning "
                       "checkpoint) with a JSON card (architecture, sizes, windows, normalisation, recipe, source "
                       "hash, the exact timm/transformers call that loads it).")
    p.add_argument("checkpoint")
    p.add_argument("--format", default="safetensors", help="safetensors (default), timm, hf or onnx")
    p.add_argument("--out", help="output file (directory for hf); default: beside the checkpoint")
    p.add_argument("--opset", type=at_least(1), help="ONNX opset (onnx only; default: the exporter's)")
    p.add_argument("--overwrite", action="store_true", help="replace the files an earlier export wrote there "
                   "(never the checkpoint, nor other files in an hf folder)")
    p.add_argument("--img-size", type=at_least(1), help="export at another image size (default: the trained one); "
                   "the onnx graph is fixed-size, so this is how to get one for another input size")
    p.add_argument("--window-size", type=at_least(1), help="window at --img-size (default: the trained one); the "
                   "log-CPB keeps its trained windows")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "reconstruct", help="panels of original / masked / reconstruction from a SimMIM pretraining checkpoint",
        description="For each image a PNG panel: original | masked input | reconstruction | reconstruction pasted "
        "into the visible patches. Images are resized and centre-cropped to the checkpoint's size (or kept at "
        "their own size with --native-size). For a model trained with the normalised target (simmim.norm_target) "
        "the prediction (t - local mean) / local std is turned back into pixels as pred * std + mean, with the "
        "mean and Bessel-corrected std of each mask cell taken per channel from the VISIBLE input pixels in the "
        "cell grown by norm_target_window // 2 px on every side (cropped at the border; all visible pixels of the "
        "image when that region has fewer than 2): the true local statistics of masked pixels are unknown.")
    p.add_argument("checkpoint", help="a simmim pretraining checkpoint or an official SimMIM release (.pth)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, folders (recursive), embedded:photos or embedded:digits")
    p.add_argument("--out", required=True, help="folder for the panels, one <image name>.png each")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="fraction of mask cells hidden (default 0.6)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the mask (one mask for all images of a size)")
    p.add_argument("--native-size", action="store_true", help="run the model at each image's own size, centre-"
                   "cropped to the largest size that tiles into mask cells and windows (default: the trained size)")
    p.add_argument("--norm-target", action=argparse.BooleanOptionalAction, default=None, help="whether the model "
                   "predicts the normalised target (default: the run's config; on for an official SwinV2 file)")
    p.add_argument("--norm-target-window", type=at_least(3), help="its window (default: the run's, or 47)")
    p.add_argument("--mask-patch-size", type=at_least(1), help="mask cell in px (default: the run's, or 32)")
    p.add_argument("--img-size", type=at_least(1), help="trained size of a file that does not record it")
    p.add_argument("--window-size", type=at_least(1), help="trained window of a file that does not record it")
    p.add_argument("--overwrite", action="store_true", help="replace panels of the same names in --out")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser(
        "inspect", help="pictures of a checkpoint's learned position bias per stage and head, and its metadata",
        description="Writes position_bias_stage<i>.png (the bias added to attention logits per relative offset, "
        "one (2W-1)x(2W-1) map per block and head, at the trained window W and at --scale x W: what log-CPB "
        "extrapolates to, or a V1 table resized bicubically) and inspect.txt (geometry, attention temperature per "
        "head, training metadata). ViT weights: position_bias_vit.png (per relative position table, shared or per "
        "block, each head's (2h-1)x(2w-1) map over the token grid, at the trained grid and --scale x it) and "
        "inspect.txt (token grid, the 3 CLS entries per head).")
    p.add_argument("checkpoint", help="any Swin V1/V2 or ViT weights simmim reads (run checkpoint, export, official, "
                   "hf)")
    p.add_argument("--out", required=True, help="folder for the pictures and inspect.txt")
    p.add_argument("--scale", type=at_least(2), default=2,
                   help="the larger window (a ViT: token grid), as a multiple of the trained one")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier inspect in --out")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("benchmark", help="SimMIM step, inference and activation memory vs timm, side by side")
    p.add_argument("--what", nargs="+", choices=["model", "memory", "highres", "pipeline", "index", "save"],
                   default=["model"],
                   help="model: the SimMIM training step and inference vs SimMIM on timm's SwinV2; memory: "
                        "activation memory per image per recompute mode; highres: one training step on one image per "
                        "memory mode and timm's (e.g. --model swinv2_base --img-size 1536 --window-size 24), each "
                        "in its own process under --memory-cap; pipeline: the input pipeline vs the "
                        "official SimMIM one; index: the folder index on a synthetic tree of files; save: seconds a "
                        "checkpoint save (weights + AdamW state) blocks training, direct vs run.async_save")
    p.add_argument("--model", default="swinv2_tiny")
    p.add_argument("--img-size", type=at_least(1), default=192)
    p.add_argument("--window-size", type=at_least(1), default=12)
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--memory-batch-sizes", type=at_least(1), nargs=2, default=(2, 4), metavar=("B1", "B2"),
                   help="memory: the two batch sizes whose peak-memory slope is the memory per image")
    p.add_argument("--inference", action="store_true", help="model: inference only (default: step and inference)")
    p.add_argument("--train", action="store_true", help="model: training step only")
    p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32"],
                   help="autocast dtype(s)")
    p.add_argument("--rounds", type=at_least(1), default=5)
    p.add_argument("--iters", type=at_least(1), default=2)
    p.add_argument("--compile", action="store_true", help="model: also time ours under torch.compile")
    p.add_argument("--threads", type=at_least(1), help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--folder", help="pipeline: time this folder of images instead of generated JPEGs")
    p.add_argument("--index-files", type=at_least(1), default=1_000_000, help="index: files in the synthetic tree")
    p.add_argument("--compare-list", action="store_true", help="index: also time a list of Path objects")
    p.add_argument("--save-dir", help="save: write the checkpoints in a temporary folder here (default: the "
                   "system's temp folder); it needs room for one checkpoint file and its temp copy")
    p.add_argument("--source-images", type=at_least(0), default=512,
                   help="pipeline: JPEGs read as a folder, as tar shards and as parquet files, one worker (0: skip)")
    p.add_argument("--shards", type=at_least(1), default=8, help="pipeline: tar shards of --source-images")
    p.add_argument("--parquet-files", type=at_least(1), default=4, help="pipeline: parquet files of them")
    p.add_argument("--first-batch-files", type=at_least(0), default=0,
                   help="pipeline: time to the first batch of a folder of this many files (hard links; 0: skip)")
    p.add_argument("--first-batch-shards", type=at_least(0), default=0,
                   help="pipeline: time to the first batch of this many small tar shards (0: skip)")
    p.add_argument("--memory-cap", type=at_least(1), default=12, metavar="GIB",
                   help="highres: memory cap of each contender's process in GiB (default 12)")
    p.add_argument("--contenders", nargs="+", metavar="NAME",
                   help="highres: some of none attention full full+sequential timm timm+checkpointing (default: all)")
    p.add_argument("--step-timeout", type=at_least(1), default=600, metavar="SEC",
                   help="highres: seconds a contender's process may run (default 600)")
    p.add_argument("--json", metavar="PATH", help="also write every figure as JSON ('-' = stdout)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("demo", help="the whole pipeline on images shipped in scikit-image/scikit-learn (CPU, minutes)")
    p.add_argument("--output", default="runs/demo", help="folder for the demo's runs (pretrain/, finetune/, "
                   "export/); a previous demo output there is replaced, any other folder is refused")
    p.add_argument("--pretrain-steps", type=at_least(1), default=300, help="SimMIM pretraining steps")
    p.add_argument("--finetune-epochs", type=at_least(1), default=4, help="fine-tuning epochs on the digits")
    p.add_argument("--compare", action="store_true", help="also fine-tune from scratch with the same budget")
    p.add_argument("--quick", action="store_true", help="a much shorter run (40 pretraining steps, 1 epoch)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("configs", help="list the bundled recipes and where they are installed",
                       description="The bundled YAML recipes (pretrain/, finetune/, demo/, accelerate/). Commands take "
                       "them by name (demo/pretrain); accelerate needs a path: --config_file $(simmim configs --path "
                       "accelerate/ddp).")
    p.add_argument("name", nargs="?", help="one recipe, e.g. accelerate/ddp (default: list all)")
    p.add_argument("--path", action="store_true", help="print file paths instead of names")
    p.set_defaults(func=cmd_configs)
    return parser


def parse_command_line(argv: Sequence[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser and the parsed ``argv`` (argparse exits 2 on a bad flag); key=value overrides may follow the
    options too."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return parser, args


def main(argv: Sequence[str] | None = None) -> int:
    set_passive_wait()  # before torch is imported: libgomp reads OMP_WAIT_POLICY once, when it loads
    parser, args = parse_command_line(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except UserError as err:  # the input cannot be used as given: one line naming the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:  # stopped for a reason outside the code: what was kept and how to go on
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    # anything else is a bug: Python shows its traceback and exits 1 (a run also wrote it into its train.log)


if __name__ == "__main__":
    sys.exit(main())
