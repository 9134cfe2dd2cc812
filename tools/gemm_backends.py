"""Time the float32 products of SwinV2-T's Linear layers in PyTorch's BLAS (F.linear / mm) and in oneDNN.

    python tools/gemm_backends.py [--batch 8] [--img-size 192] [--threads N] [--repeats 7]

For each (tokens M, in K, out N) of the model at the given batch and size: the forward product, the input gradient
(grad @ W) and the weight gradient (grad^T @ x), each the median of interleaved repeats. This is the measurement
behind models/onednn_linear.py (which product goes where).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from simmim.compat import mkldnn_linear as dnn


def shapes(batch: int, img_size: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of qkv, proj, fc1, fc2 per stage and of the patch merges of SwinV2-T."""
    out = []
    for i, c in enumerate((96, 192, 384, 768)):
        m = batch * (img_size // 4 // 2**i) ** 2
        out += [(m, c, 3 * c), (m, c, c), (m, c, 4 * c), (m, 4 * c, c)]
        if i:
            out.append((m, 2 * c, c))
    return list(dict.fromkeys(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=192)
    p.add_argument("--threads", type=int)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def ms(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms, median of {args.repeats}")
    print(f"{'M':>6} {'K':>5} {'N':>5} | {'fwd blas':>9} {'onednn':>7} | {'dx blas':>8} {'onednn':>7} | "
          f"{'dW blas':>8} {'onednn':>7}")
    totals = [0.0] * 6
    for m, k, n in shapes(args.batch, args.img_size):
        x, w, b, g = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
        fns = [lambda x=x, w=w, b=b: F.linear(x, w, b), lambda x=x, w=w, b=b: dnn(x, w, b),
               lambda g=g, w=w: g @ w, lambda g=g, w=w: dnn(g, w.t().contiguous(), None),
               lambda g=g, x=x: g.t() @ x, lambda g=g, x=x: dnn(g.t(), x.t(), None)]
        for fn in fns:
            fn()
        times = [[] for _ in fns]
        for _ in range(args.repeats):
            for i, fn in enumerate(fns):
                times[i].append(ms(fn))
        med = [statistics.median(t) for t in times]
        totals = [a + b for a, b in zip(totals, med, strict=True)]
        print(f"{m:>6} {k:>5} {n:>5} | {med[0]:>9.2f} {med[1]:>7.2f} | {med[2]:>8.2f} {med[3]:>7.2f} | "
              f"{med[4]:>8.2f} {med[5]:>7.2f}")
    print(f"{'total':>18} | {totals[0]:>9.1f} {totals[1]:>7.1f} | {totals[2]:>8.1f} {totals[3]:>7.1f} | "
          f"{totals[4]:>8.1f} {totals[5]:>7.1f}")


if __name__ == "__main__":
    main()
