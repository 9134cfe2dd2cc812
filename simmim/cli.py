"""The ``simmim`` command line: parses arguments and dispatches to the library. Output goes to stdout here only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def _count_params(name: str, img_size: int, window_size: int) -> tuple[int, list]:
    import torch

    from simmim.models import create_model

    with torch.device("meta"):  # no memory is allocated, so even SwinV2-G is instant
        model = create_model(name, img_size=img_size, window_size=window_size)
    return sum(p.numel() for p in model.parameters()), model.effective_window_sizes


def cmd_models(args: argparse.Namespace) -> int:
    """Print the variants with parameter counts and effective per-stage windows at the given size."""
    from simmim.models import VARIANTS, list_models

    names = [args.name] if args.name else list_models()
    if args.name and args.name not in VARIANTS:
        print(f"error: unknown model {args.name!r}; choose one of: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        try:
            n, windows = _count_params(name, args.img_size, args.window_size)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        v = VARIANTS[name]
        rows.append(f"{name:<14} {n / 1e6:>8.1f}M  {v['embed_dim']:>4}  {str(v['depths']):<14} "
                    f"{str(v['num_heads']):<18} " + "/".join(str(w[0]) for w in windows))
    header = f"{'model':<14} {'params':>9}  {'C':>4}  {'depths':<14} {'heads':<18}"
    print(f"{header} windows @ {args.img_size}px W{args.window_size}", *rows, sep="\n")
    return 0


def _fail(err: BaseException) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def cmd_pretrain(args: argparse.Namespace) -> int:
    """SimMIM pretraining from a config, with --data/--output/--resume and key=value overrides."""
    from simmim.config import ConfigError, PretrainConfig, load_config
    from simmim.configs import resolve
    from simmim.engine import NonFiniteLossError
    from simmim.pretrain import run

    overrides = list(args.overrides)
    for flag, key in ((args.data, "data.path"), (args.output, "run.output"), (args.resume, "run.resume")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    try:
        cfg = load_config(PretrainConfig, resolve(args.config), overrides)
        summary = run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return _fail(err)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not summary["main_process"]:
        return 0
    print(f"pretrained {summary['steps']} steps: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}")
    print(f"  checkpoint:  {summary['checkpoint']}")
    print(f"  tensorboard: tensorboard --logdir {summary['output']}/tensorboard")
    print(f"  images:      {summary['output']}/images")
    if summary["skipped_files"] or summary["skipped_steps"]:
        print(f"  skipped: {summary['skipped_files']} unreadable inputs, {summary['skipped_steps']} steps")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simmim", description="SimMIM pretraining, fine-tuning and export for Swin Transformer V2.")
    parser.add_argument("--version", action="version", version=f"simmim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("models", help="list the SwinV2 variants with parameter counts and effective windows")
    p.add_argument("name", nargs="?", help="one variant (default: all)")
    p.add_argument("--img-size", type=int, default=192)
    p.add_argument("--window-size", type=int, default=12)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("pretrain", help="SimMIM pretraining on a folder of images or a datasets dataset",
                       description="SimMIM pretraining. Overrides are dotted keys: optim.base_lr=2e-4 "
                       "data.batch_size=64 model.name=swinv2_tiny. Many GPUs: accelerate launch -m simmim pretrain.")
    p.add_argument("config", help="YAML file, or a bundled recipe such as pretrain/swinv2_base_192_w12_800ep")
    p.add_argument("--data", help="folder of images, datasets save_to_disk folder, hf:NAME, or embedded")
    p.add_argument("--output", help="run directory (checkpoints, tensorboard, images, config.yaml, train.log)")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint in the run directory) or a checkpoint path")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come after the options too
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
