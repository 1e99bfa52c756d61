"""What a run of ``train_swav.py`` says and leaves: its log lines, its
per-epoch history (saved in the checkpoint), ``results.json``, ``history.png`` and the summary lines."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from run_dir import write_atomically
from swav_data import DataBundle

HEALTH_METRICS = ("prototype_usage", "code_entropy", "loss_over_lnk")
logger = logging.getLogger("train_swav")


class RunHistory:
    """Per-epoch records and the model settings of the run, saved in the checkpoint (plain numbers and
    strings), so that a resumed run keeps its history and ``linear_eval.py`` can rebuild the network."""

    MODEL_SETTINGS = ("arch", "small_stem", "feat_dim", "hidden_dim", "num_prototypes", "dataset", "eval_size", "seed")

    def __init__(self, args: argparse.Namespace | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.config: dict[str, Any] = {k: getattr(args, k) for k in self.MODEL_SETTINGS} if args is not None else {}
        if args is not None:
            self.config["epochs"] = args.epochs  # the length the schedule was planned for (not a model setting)

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "config": dict(self.config)}

    # every record's fields and their kinds: a history missing one would fail later, in the results or the plot
    RECORD_FIELDS = {"epoch": int, "loss": float, "queue_used": bool, "lr": float, "images_per_s": float}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        records = state.get("records") if isinstance(state, dict) else None
        config = state.get("config", {}) if isinstance(state, dict) else None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("the checkpoint's history is not a list of per-epoch records")
        for record in records:
            for field, kind in self.RECORD_FIELDS.items():
                value = record.get(field)
                ok = (
                    isinstance(value, bool)
                    if kind is bool
                    else isinstance(value, (int, float)) and not isinstance(value, bool)
                )
                if not ok or (kind is int and not isinstance(value, int)):
                    raise ValueError(f"the checkpoint's history has a record whose '{field}' is {value!r}")
        if not isinstance(config, dict) or not set(self.MODEL_SETTINGS) <= set(config):
            raise ValueError(
                f"the checkpoint's history lacks the settings of the run ({', '.join(self.MODEL_SETTINGS)})"
            )
        self.records = [dict(r) for r in records]
        self.config = dict(config)


def write_results(results: dict[str, Any], output_dir: Path, compare_to: str | None = None) -> None:
    """results.json and history.png in ``output_dir`` (each written atomically, the plot over the reference curves
    of ``compare_to`` when given), and the summary lines."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(output_dir / "results.json", lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
    if results.get("status") == "preempted":
        print(f"{results['signal']} at iteration {results['iteration']}: checkpoint written", flush=True)
        return
    lines = [
        f"kNN top-1 (k-NN on {results.get('scored_on', 'the held-out split')}), after {results['epochs']} epochs:",
        f"  SwAV pretrained       {results['knn_top1']:.4f}",
        f"  same net, random init {results['knn_top1_random_init']:.4f}",
        f"  raw pixels            {results['knn_top1_raw_pixels']:.4f}",
    ]
    if results.get("online_linear_top1") is not None:
        lines.append(f"online linear probe top-1 {results['online_linear_top1']:.4f}")
    if results.get("cluster_nmi") is not None:
        kmeans = results.get("cluster_nmi_kmeans_raw_pixels")
        lines.append(
            f"clusters (NMI with the labels): SwAV prototypes {results['cluster_nmi']:.4f}"
            + (f", k-means on raw pixels {kmeans:.4f}" if kmeans is not None else "")
        )
    lines.append(f"results in {output_dir / 'results.json'}")
    reference = json.loads(Path(compare_to).read_text()) if compare_to else None
    write_atomically(output_dir / "history.png", lambda p: plot_history(results, p, reference))
    lines.append(f"plot in {output_dir / 'history.png'}")
    print("\n".join(lines), flush=True)


def plot_history(results: dict[str, Any], path: Path, reference: dict[str, Any] | None = None) -> None:
    """The loss per epoch, the k-NN top-1 per epoch against the random-init and raw-pixel levels, and the health
    monitor's prototype usage and code entropy (with the epochs where collapse was suspected); over the bands of
    ``reference`` curves (reference_curves.py) when given, so that a run shows at a glance whether it looks normal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    history = results["history"]
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_knn, ax_health) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o", markersize=3)
    ax_loss.set(xlabel="epoch", ylabel="SwAV loss", title="training loss")
    evaluated = [r for r in history if "knn_top1" in r]
    ax_knn.plot(
        [r["epoch"] for r in evaluated], [r["knn_top1"] for r in evaluated], marker="o", markersize=3, color="C1",
        label="SwAV pretrained",
    )  # fmt: skip
    probed = [r for r in history if "online_linear_top1" in r]
    if probed:
        ax_knn.plot(
            [r["epoch"] for r in probed], [r["online_linear_top1"] for r in probed], marker="s", markersize=3,
            color="C6", label="online linear probe",
        )  # fmt: skip
    for key, label, colour in (
        ("knn_top1_raw_pixels", "raw pixels", "C2"),
        ("knn_top1_random_init", "same net, random init", "C3"),
    ):
        if results.get(key) is not None:
            ax_knn.axhline(results[key], linestyle="--", color=colour, label=f"{label} {results[key]:.3f}")
    ax_knn.set(
        xlabel="epoch", ylabel="top-1", title=f"k-NN and linear probes on held-out images ({results['dataset']})"
    )
    ax_knn.legend(loc="lower right")
    for key, label, colour in (
        ("prototype_usage", "prototypes used", "C4"),
        ("code_entropy", "code entropy / ln K", "C5"),
        ("loss_over_lnk", "loss / ln K", "C0"),
    ):
        ax_health.plot(epochs, [r.get(key) for r in history], marker="o", markersize=3, color=colour, label=label)
    for alarm in [r["epoch"] for r in history if r.get("collapse_suspected")]:
        ax_health.axvline(alarm, color="red", alpha=0.5)
    ax_health.set(xlabel="epoch", ylabel="fraction", title="training health (red: collapse suspected)")
    ax_health.legend(loc="best")
    if reference is not None:
        _draw_reference_bands(reference, ax_loss, ax_knn, ax_health)
    _draw_queue_retreats(results.get("queue_retreats", []), ax_loss, ax_knn, ax_health)
    for ax in (ax_loss, ax_knn, ax_health):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _draw_queue_retreats(retreats: list[dict[str, int]], ax_loss: Any, *others: Any) -> None:
    """A dotted line where the queue guard took the run back (the curves after it are the epochs run again)."""
    for i, retreat in enumerate(retreats):
        for ax in (ax_loss, *others):
            ax.axvline(retreat["back_to_epoch"], color="orange", linestyle=":", linewidth=2)
        ax_loss.annotate(
            f" queue guard: back from epoch {retreat['at_epoch']}", (retreat["back_to_epoch"], 0.95 - 0.07 * i),
            xycoords=("data", "axes fraction"), color="darkorange", fontsize=8,
        )  # fmt: skip


def _draw_reference_bands(reference: dict[str, Any], ax_loss: Any, ax_knn: Any, ax_health: Any) -> None:
    """Each reference curve as a band from its lowest to its highest value over the reference runs."""
    ref_epochs, curves = reference["epochs"], reference["curves"]
    panels = {"loss": (ax_loss, "grey"), "knn_top1": (ax_knn, "C1")}
    panels |= {"prototype_usage": (ax_health, "C4"), "code_entropy": (ax_health, "C5")}
    panels |= {"loss_over_lnk": (ax_health, "C0")}
    for name, (ax, colour) in panels.items():
        if name in curves:
            band = curves[name]
            ax.fill_between(
                band.get("epochs", ref_epochs), band["min"], band["max"], color=colour, alpha=0.3, linewidth=0
            )
    ax_loss.set_title("training loss (bands: the reference runs)")


def queue_retreats(objects: dict[str, Any]) -> list[dict[str, int]]:
    """What the queue guard did: one record per retreat (none without a guard)."""
    guard = objects.get("queue_guard")
    return [dataclasses.asdict(r) for r in guard.retreats] if guard is not None else []


def log_start(data: DataBundle, objects: dict[str, Any], args: argparse.Namespace) -> None:
    logger.info(
        f"SwAV on {args.dataset}: {len(data.pretrain)} images, {idist.get_world_size()} process(es) x batch "
        f"{args.batch_size}, {data.multicrop.total_crops} crops {data.multicrop.size_crops}, {args.arch}, "
        f"{args.num_prototypes} prototypes, queue {objects['queue_handler'].queue_length or args.queue_length} from "
        f"epoch {args.epoch_queue_starts + 1}, device {idist.device()}, augmentation "
        f"{'batched on the device' if args.gpu_augment else 'per image in workers'}"
    )


def log_epoch(record: dict[str, Any], args: argparse.Namespace) -> None:
    knn = f", kNN top-1 {record['knn_top1']:.4f}" if "knn_top1" in record else ""
    knn += f", online linear top-1 {record['online_linear_top1']:.4f}" if "online_linear_top1" in record else ""
    logger.info(
        f"epoch {record['epoch']}/{args.epochs}: loss {record['loss']:.4f}{knn}, prototypes used "
        f"{record['prototype_usage']:.2f}, code entropy {record['code_entropy']:.2f}, "
        f"queue {'used' if record['queue_used'] else 'not used'}, {record['images_per_s']:.0f} images/s"
    )
