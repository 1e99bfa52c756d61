#!/usr/bin/env python
"""How the SwAV loss's time grows with the queue length and the number of prototypes: ours against lightly's
``SwaVLoss`` (when installed) at batch 64, 2+6 crops; prints a table and saves a PNG plot (matplotlib).

    python benchmarks/sweep.py --output benchmarks/loss_sweep.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _machine import describe
from loss import lightly_loss, ours, time_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queue-lengths", type=int, nargs="+", default=[0, 1920, 3840, 7680, 15360, 30720])
    parser.add_argument("--num-prototypes", type=int, nargs="+", default=[512, 1000, 3000])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("loss_sweep.png"))
    args = parser.parse_args()
    candidates = {"ignite-swav": ours()}
    lightly = lightly_loss()
    if lightly is not None:
        candidates["lightly"] = lightly
    machine = describe("cpu")
    print(machine)
    print(f"batch {args.batch_size}, 2+6 crops, feat_dim 128; median of {args.repeats} forward+backward (ms)")
    print(f"{'K':>5} {'queue':>6} " + " ".join(f"{name:>12}" for name in candidates))
    results: dict[tuple[str, int], list[float]] = {}
    for num_prototypes in args.num_prototypes:
        for queue_length in args.queue_lengths:
            medians, _ = time_case(candidates, args.batch_size, queue_length, num_prototypes, args.repeats)
            for name, seconds in medians.items():
                results.setdefault((name, num_prototypes), []).append(seconds * 1000)
            cells = " ".join(f"{medians[name] * 1000:12.1f}" for name in candidates)
            print(f"{num_prototypes:>5} {queue_length:>6} {cells}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot")
        return
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for (name, num_prototypes), milliseconds in results.items():
        style = "-" if name == "ignite-swav" else "--"
        axis.plot(args.queue_lengths, milliseconds, style, marker="o", label=f"{name}, K={num_prototypes}")
    axis.set_xlabel("queue length (rows per assigned crop)")
    axis.set_ylabel("loss forward+backward (ms)")
    axis.set_title(f"SwAV loss time, batch {args.batch_size}, 2+6 crops", fontsize=10)
    axis.text(0.01, -0.2, machine, transform=axis.transAxes, fontsize=7)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    print(f"plot saved to {args.output}")


if __name__ == "__main__":
    main()
