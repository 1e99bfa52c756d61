#!/usr/bin/env python
"""Reference curves for ``train_swav.py --compare-to``: the per-epoch loss, k-NN top-1 and health figures of
several runs' ``results.json`` (the main job's seeds), as the lowest and highest value of each epoch.

    python examples/reference_curves.py runs/seed0/results.json runs/seed1/results.json runs/seed2/results.json \\
        --output examples/configs/reference/mnist5k.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CURVES = ("loss", "knn_top1", "prototype_usage", "code_entropy", "loss_over_lnk")


def reference_curves(runs: list[dict]) -> dict:
    """``{"epochs": [...], "curves": {name: {"min": [...], "max": [...]}}}`` over the epochs every run has; a curve
    measured on fewer of them (the k-NN probe, every ``--eval-every`` epochs) has its own ``"epochs"``."""
    histories = [{r["epoch"]: r for r in run["history"]} for run in runs]
    epochs = sorted(set.intersection(*(set(h) for h in histories)))
    curves = {}
    for name in CURVES:
        measured = [e for e in epochs if all(name in h[e] for h in histories)]
        if measured:
            values = [[h[e][name] for h in histories] for e in measured]
            curves[name] = {"min": [min(v) for v in values], "max": [max(v) for v in values]}
            if measured != epochs:
                curves[name]["epochs"] = measured
    return {"epochs": epochs, "curves": curves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="results.json files of train_swav.py")
    parser.add_argument("--output", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.results]
    datasets = {run["dataset"] for run in runs}
    if len(datasets) != 1:
        print(f"error: the runs are of several data sets ({sorted(datasets)})", file=sys.stderr)
        return 2
    seeds = sorted(str(run.get("seed", "?")) for run in runs)  # a results.json of before 2026-12-05 names none
    about = f"train_swav.py on {datasets.pop()}, {len(runs)} runs (seeds {seeds}): per-epoch lowest and highest"
    args.output.write_text(json.dumps({"_about": about, **reference_curves(runs)}, indent=1) + "\n")
    print(f"reference curves in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
