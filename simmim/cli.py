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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
