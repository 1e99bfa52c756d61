#!/usr/bin/env python
"""Plot the label efficiency measured by ``finetune.py``: held-out top-1 against the fraction of labels, for the
SwAV-pretrained network, the same network from scratch and a logistic regression on raw pixels (the mean over the
seeds, with their lowest and highest).

    python examples/plot_finetune.py runs/finetune/*.json --output docs/label_efficiency.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ARMS = (
    ("top1_swav", "SwAV pretrained, fine-tuned"),
    ("top1_scratch", "same net from scratch"),
    ("top1_pixels", "logistic regression on pixels"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="finetune.py's JSON files")
    parser.add_argument("--output", type=Path, required=True, help="the PNG file to write")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.results]
    by_fraction: dict[float, list[dict]] = defaultdict(list)
    for run in runs:
        by_fraction[run["label_fraction"]].append(run)
    fractions = sorted(by_fraction)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in ARMS:
        values = [[run[key] for run in by_fraction[f]] for f in fractions]
        means = [statistics.mean(v) for v in values]
        ax.plot(fractions, means, marker="o", label=label)
        ax.fill_between(fractions, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    ax.set(xscale="log", xlabel="fraction of the training split's labels", ylabel="held-out top-1")
    ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
    ax.set_title(f"label efficiency ({runs[0]['dataset']}, seeds {sorted({r['seed'] for r in runs})})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"plot in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
