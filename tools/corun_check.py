"""Does a second busy rank slow this one's compute? (emulated-cluster diagnosis, BENCHMARKS.md)

`lynxpipe profile --measure` times ops with the other core idle, while training runs both ranks
at once. This times a transformer layer's forward + backward at `gpt-small-cpu`'s sizes (h 512,
seq 256, micro-batch 2, fp32, one thread) alone, then in two processes at once, and prints the
medians side by side.

    python tools/corun_check.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time


def _median_step_ms(seconds: float) -> float:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.0, batch_first=True)
    x = torch.randn(2, 256, 512, requires_grad=True)
    for _ in range(3):
        layer(x).sum().backward()
    times, end = [], time.time() + seconds
    while time.time() < end:
        start = time.perf_counter()
        layer(x).sum().backward()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        alone = pool.apply(_median_step_ms, (args.seconds,))
    with ctx.Pool(2) as pool:
        pair = pool.map(_median_step_ms, [args.seconds] * 2)
    print(f"layer fwd+bwd, 1 thread: alone {alone:.1f} ms; two at once "
          f"{pair[0]:.1f} / {pair[1]:.1f} ms ({max(pair) / alone - 1:+.1%})")


if __name__ == "__main__":
    main()
