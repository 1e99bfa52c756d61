"""The command line of ``train_swav.py``: its flags, the settings of each data set, the published SwAV recipes,
and the checks that turn a bad value into one clear line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any

import ignite.distributed as idist

DATASETS = ("mnist5k", "digits", "cifar10", "stl10", "imagefolder")
ARCHS = ("small_resnet", "resnet18", "resnet50")

#: the experiment loggers of --logger, each named after the package it needs
LOGGERS = ("tensorboard", "mlflow", "wandb", "clearml", "neptune", "visdom", "polyaxon")


def missing_packages(names: list[str]) -> list[str]:
    """The packages of the loggers ``names`` that are not installed, in the loggers' order."""
    return [name for name in names if name in LOGGERS and importlib.util.find_spec(name) is None]


class ExampleError(Exception):
    """A problem with the command line, the data or a checkpoint, reported as one clear line."""


CONFIGS = Path(__file__).resolve().parent / "configs"


def read_config(path: Path) -> dict[str, Any]:
    """The settings of a JSON file of ``configs/`` (keys named like the flags; ``_about`` says what it is)."""
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ExampleError(f"the settings file '{path}' cannot be read: {error}") from None
    if not isinstance(settings, dict):
        raise ExampleError(f"the settings file '{path}' must hold one JSON object of settings")
    return {key: value for key, value in settings.items() if not key.startswith("_")}


# The settings every run has, then each data set's and each published recipe's: one JSON file each, so that adding
# a recipe means adding a file to configs/recipes/.
COMMON = read_config(CONFIGS / "common.json")
DATASET_DEFAULTS = {name: read_config(CONFIGS / "datasets" / f"{name}.json") for name in DATASETS}
RECIPES = {path.stem: read_config(path) for path in sorted((CONFIGS / "recipes").glob("*.json"))}


# What a flag's default means where it is not a value of its own.
_DEFAULT_TEXT = {"dataset": "mnist5k", "final_lr": "lr / 1000", "freeze_prototypes_epochs": "not set"}


def _default_help(key: str) -> str:
    """The real default of a flag: one value, or its value per data set where they differ; and under --recipe."""
    values: dict[str, Any] = {}
    for name in DATASETS:
        if key in CROP_KEYS:
            values[name] = list(getattr(crop_preset(name), key))
        elif key in WARP_KEYS:
            values[name] = getattr(crop_preset(name).settings, key)
        else:
            values[name] = (COMMON | DATASET_DEFAULTS[name]).get(key)
    groups: dict[str, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(json.dumps(value), []).append(name)
    if len(groups) == 1:
        value = next(iter(values.values()))
        text = _DEFAULT_TEXT.get(key, "none") if value is None else f"{value}"
    else:
        text = ", ".join(f"{'/'.join(names)}: {json.loads(v)}" for v, names in groups.items())
    recipe_values = {json.dumps(recipe.get(key, COMMON.get(key))) for recipe in RECIPES.values()}
    if any(key in recipe for recipe in RECIPES.values()):
        single = str(json.loads(recipe_values.pop())) if len(recipe_values) == 1 else "the value of its script"
        text += f"; --recipe: {single}"
    return f"(default: {text})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_swav.py",
        description="Pretrain SwAV with ignite-swav and report k-NN top-1 (pretrained, random init, raw pixels). "
        "Settings come from the command line, then --recipe, then the data set's defaults shown here.",
    )
    parser.set_defaults(setting_keys=[])  # the flags that are settings of the run: --print-config prints them

    def setting(flag: str, help_text: str, **kwargs: Any) -> None:
        key = flag.lstrip("-").replace("-", "_")
        parser.get_default("setting_keys").append(key)
        help_text = argparse.SUPPRESS if not help_text else f"{help_text} {_default_help(key)}"
        parser.add_argument(flag, default=None, help=help_text, **kwargs)

    add_run_flags(parser, setting)
    add_training_flags(setting)
    add_swav_flags(setting)
    add_data_flags(setting)
    add_process_flags(parser)
    return parser


def add_run_flags(parser: argparse.ArgumentParser, setting: Any) -> None:
    add = parser.add_argument
    add("--recipe", default=None, help=f"a published SwAV recipe ({', '.join(RECIPES)}) or a JSON file of settings")
    add("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    setting("--dataset", "data set to pretrain on; mnist5k and digits ship inside Python packages", choices=DATASETS)
    add("--data-dir", type=Path, default=Path("data"), help="where a real data set lies (default: data)")
    add("--download", action="store_true", help="download CIFAR-10 / STL-10 into --data-dir if missing")
    add("--output-dir", type=Path, default=Path("runs/swav"), help="checkpoints, results (default: runs/swav)")
    add(
        "--compare-to",
        default=None,
        help="draw history.png over reference curves: 'reference' (the main job's seeds 0-2, shipped for its data "
        "set) or a JSON file of reference_curves.py",
    )
    add(
        "--logger",
        nargs="+",
        choices=(*LOGGERS, "none"),
        default=["tensorboard"],
        help="experiment loggers, Ignite's own (several allowed; 'none': none): loss, learning rate, health, probes "
        "and speed, and the settings as the run's parameters (default: tensorboard)",
    )
    add(
        "--resume-from",
        type=Path,
        default=None,
        help="checkpoint of this script to continue from, up to --epochs; 'auto': the newest valid one of "
        "--output-dir, or a fresh start when there is none (for jobs that are requeued)",
    )


def add_training_flags(setting: Any) -> None:
    setting("--epochs", "total epochs", type=int)
    setting("--batch-size", "batch size per process", type=int)
    setting("--lr", "peak learning rate", type=float)
    setting("--final-lr", "learning rate at the end of the cosine decay; none: lr / 1000", type=float)
    setting("--warmup-epochs", "epochs of linear warm-up (set every iteration) before the cosine decay", type=int)
    setting("--warmup-start-lr", "learning rate at the start of the warm-up", type=float)
    setting("--weight-decay", "weight decay", type=float)
    setting(
        "--optimizer", "SGD with momentum, or LARS (timm.optim.Lars as the reference's LARC)", choices=("sgd", "lars")
    )
    setting("--momentum", "momentum of SGD / LARS", type=float)
    setting("--sync-bn", "SyncBatchNorm on several CUDA processes", action=argparse.BooleanOptionalAction)
    setting(
        "--amp",
        "mixed precision: bfloat16 on the CPU, float16 with a GradScaler on CUDA",
        action=argparse.BooleanOptionalAction,
    )
    setting(
        "--deterministic",
        "reseed every epoch from a run seed saved in the checkpoint (Ignite's DeterministicEngine), so that a resumed "
        "run trains exactly as the uninterrupted one on the same number of processes; on CUDA, deterministic "
        "algorithms can be slower",
        action=argparse.BooleanOptionalAction,
    )
    setting("--expected-world-size", "", type=int)  # a recipe's number of processes, for its warning


def add_swav_flags(setting: Any) -> None:
    setting("--arch", "backbone", choices=ARCHS)
    setting("--small-stem", "3x3 stem without max-pool, for small images", action=argparse.BooleanOptionalAction)
    setting("--num-prototypes", "number of prototypes", type=int)
    setting("--feat-dim", "width of the embeddings", type=int)
    setting("--hidden-dim", "hidden width of the projection head (0: a single linear layer)", type=int)
    setting("--queue-length", "global queue length over all processes, 0 for none", type=int)
    setting("--epoch-queue-starts", "epochs trained before the queue is created", type=int)
    setting(
        "--queue-guard",
        "when the health monitor blames the queue, go back to just before it came in and let it come in later and "
        "shorter (SwAVQueueGuard)",
        choices=("on", "off"),
    )
    setting("--freeze-prototypes-iters", "first iterations whose steps leave the prototypes as they are", type=int)
    setting(
        "--freeze-prototypes-epochs",
        "the same in epochs (the reference freezes one ImageNet epoch); replaces --freeze-prototypes-iters",
        type=float,
    )
    setting("--temperature", "softmax temperature of the loss", type=float)
    setting("--epsilon", "Sinkhorn regularisation", type=float)
    setting("--sinkhorn-iterations", "Sinkhorn-Knopp iterations", type=int)


def add_data_flags(setting: Any) -> None:
    setting("--size-crops", "crop sizes in pixels, large first", type=int, nargs="+")
    setting("--num-crops", "crops of each size", type=int, nargs="+")
    setting("--min-scale-crops", "smallest area of each crop size, as a fraction of the image", type=float, nargs="+")
    setting("--max-scale-crops", "largest area of each crop size, as a fraction of the image", type=float, nargs="+")
    setting("--rotation", "largest angle, in degrees, of each crop's random rotation (0: none)", type=float)
    setting(
        "--elastic-alpha", "strength of each crop's elastic warp (torchvision's ElasticTransform; 0: none)", type=float
    )
    setting("--elastic-sigma", "smoothness of the elastic warp, in pixels", type=float)
    setting(
        "--gpu-augment",
        "multi-crop whole batches on the training device (BatchedMultiCrop); the DataLoader only loads images",
        action=argparse.BooleanOptionalAction,
    )
    setting(
        "--decode-on-device",
        "imagefolder: the workers only read the files' bytes, the training device decodes whole batches (nvJPEG on "
        "a GPU) before --gpu-augment makes the crops",
        action=argparse.BooleanOptionalAction,
    )
    setting("--num-workers", "DataLoader worker processes per training process", type=int)
    setting("--eval-size", "image size of the k-NN probe", type=int)
    setting("--knn-k", "neighbours of the k-NN probe", type=int)
    setting("--eval-every", "run the k-NN probe every N epochs (and after the last)", type=int)
    setting(
        "--online-probe",
        "train a linear classifier on the backbone's features during pretraining (data sets with labels)",
        action=argparse.BooleanOptionalAction,
    )


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--compile", action="store_true", help="torch.compile the model (slow first steps; for GPUs)")
    add("--nproc-per-node", type=int, default=None, help="processes to spawn on this node (idist.Parallel)")
    add("--backend", choices=("gloo", "nccl"), default=None, help="distributed backend (default: none, 1 process)")
    add(
        "--master-port",
        type=int,
        default=None,
        help="port the spawned processes meet on (default: MASTER_PORT if set, else a free port of this machine, so "
        "that two runs can share it)",
    )
    add("--seed", type=int, default=0, help="seed of the network's initialisation, the split and the data order")
    add(
        "--select",
        action="store_true",
        help="choose settings: the k-NN probe's bank is 80%% of the training split and it scores the other 20%%; the "
        "held-out split is not loaded (mnist5k, digits; with --no-online-probe, which trains on those labels)",
    )
    add("--max-iters-per-epoch", type=int, default=None, help=argparse.SUPPRESS)  # for quick tests


def recipe_settings(recipe: str) -> dict[str, Any]:
    """The settings of ``--recipe``: a published recipe's name, or the path of a JSON file of settings."""
    if recipe in RECIPES:
        return RECIPES[recipe]
    path = Path(recipe)
    if path.suffix != ".json" or not path.is_file():
        raise ExampleError(
            f"--recipe {recipe!r} is neither a published recipe ({', '.join(RECIPES)}) nor a JSON file of settings"
        )
    settings = read_config(path)
    known = set(build_parser().get_default("setting_keys")) | {"dataset"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ExampleError(f"--recipe '{path}' has settings no flag of this script sets: {unknown}")
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings of the run: the command line, then --recipe, then the data set's defaults; checked."""
    args = build_parser().parse_args(argv)
    given = {key for key, value in vars(args).items() if value is not None}
    recipe = recipe_settings(args.recipe) if args.recipe else {}
    if args.dataset is None:
        args.dataset = recipe.get("dataset", "mnist5k")
    for source in (recipe, DATASET_DEFAULTS[args.dataset], COMMON):
        for key, value in source.items():
            if getattr(args, key, None) is None and key not in given:
                setattr(args, key, value)
    if args.final_lr is None:
        args.final_lr = args.lr / 1000
    if args.freeze_prototypes_epochs is not None and "freeze_prototypes_iters" in given:
        raise ExampleError("give --freeze-prototypes-iters or --freeze-prototypes-epochs, not both")
    preset = crop_preset(args.dataset)
    for key in CROP_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, list(getattr(preset, key)))
    for key in WARP_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, getattr(preset.settings, key))
    args.given = sorted(given)  # the settings the user chose: sizing for the data leaves them as they are
    check_args(args)
    return args


CROP_KEYS = ("size_crops", "num_crops", "min_scale_crops", "max_scale_crops")
WARP_KEYS = ("rotation", "elastic_alpha", "elastic_sigma")  # one number for all crop sizes


def crop_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The multi-crop settings of ``args``, as :func:`crop_preset` takes them."""
    return {key: tuple(getattr(args, key)) for key in CROP_KEYS} | {key: getattr(args, key) for key in WARP_KEYS}


def crop_preset(dataset: str, **overrides: Any) -> Any:
    """The multi-crop augmentation of ``dataset`` (a ``MultiCropTransform``), with ``overrides``."""
    from ignite_swav import MultiCropTransform

    if dataset == "mnist5k":
        return MultiCropTransform.for_mnist(**overrides)
    if dataset == "digits":
        return MultiCropTransform.for_digits(**overrides)
    if dataset == "cifar10":
        return MultiCropTransform.for_cifar(**overrides)
    if dataset == "stl10":
        stl = {"size_crops": (96, 48), "num_crops": (2, 4), "min_scale_crops": (0.14, 0.05)}
        return MultiCropTransform(**(stl | {"max_scale_crops": (1.0, 0.14)} | overrides))
    size = overrides.get("size_crops", (224,))[0]
    if size <= 96:  # no blur at this size (sizing.py sizes an ImageFolder of small images so)
        return MultiCropTransform.for_small_images(size, **overrides)
    return MultiCropTransform(**overrides)


def _int_in_range(args: argparse.Namespace, key: str, minimum: int, maximum: int | None) -> None:
    value = getattr(args, key)
    flag = "--" + key.replace("_", "-")
    if value < minimum:
        raise ExampleError(f"{flag} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ExampleError(f"{flag} must be <= {maximum}, got {value}")


def _finite(args: argparse.Namespace, key: str, low: float, *, strict: bool) -> None:
    value = getattr(args, key)
    flag = "--" + key.replace("_", "-")
    if not math.isfinite(value) or value < low or (strict and value == low):
        relation = ">" if strict else ">="
        raise ExampleError(f"{flag} must be a finite number {relation} {low}, got {value}")


# (smallest, largest) of every integer setting; the largest are typing mistakes that would exhaust memory before
# any message
_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "epochs": (1, None),
    "batch_size": (1, 1_000_000),
    "num_prototypes": (1, 1_000_000),
    "feat_dim": (1, 65_536),
    "hidden_dim": (0, 65_536),
    "queue_length": (0, 10_000_000),
    "sinkhorn_iterations": (1, 1000),
    "knn_k": (1, None),
    "eval_every": (1, None),
    "eval_size": (1, 4096),
    "epoch_queue_starts": (0, None),
    "freeze_prototypes_iters": (0, None),
    "num_workers": (0, None),
    "warmup_epochs": (0, None),
    "seed": (0, 2**31 - 1),  # numpy's generator takes at most 2**32 - 1, and every rank adds its rank
    "nproc_per_node": (1, None),
    "master_port": (1, 65535),
    "max_iters_per_epoch": (1, None),
}


# the largest sensible value of some float settings: larger ones are typing mistakes (SwAV's recipes use lr 0.6-4.8)
_LARGEST = {"lr": 1000.0, "final_lr": 1000.0, "warmup_start_lr": 1000.0, "weight_decay": 10.0, "momentum": 1.0}


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that could only fail later, inside training, or train nonsense."""
    for key, (minimum, maximum) in _INT_RANGES.items():
        if getattr(args, key) is not None:
            _int_in_range(args, key, minimum, maximum)
    for key in ("lr", "temperature", "epsilon"):
        _finite(args, key, 0.0, strict=True)
    for key in ("final_lr", "warmup_start_lr", "weight_decay", "momentum"):
        _finite(args, key, 0.0, strict=False)
    for key, largest in _LARGEST.items():
        if getattr(args, key) > largest:
            raise ExampleError(f"--{key.replace('_', '-')} must be at most {largest:g}, got {getattr(args, key):g}")
    for key in ("temperature", "epsilon"):  # scores / temperature and scores / epsilon must fit float32
        if getattr(args, key) < 1e-30:
            raise ExampleError(f"--{key} must be at least 1e-30, got {getattr(args, key):g}")
    if args.freeze_prototypes_epochs is not None:
        _finite(args, "freeze_prototypes_epochs", 0.0, strict=False)
    if args.decode_on_device and (args.dataset != "imagefolder" or not args.gpu_augment):
        raise ExampleError(
            "--decode-on-device is for --dataset imagefolder (files of JPEG or PNG images) with --gpu-augment (the "
            f"crops made on the device); got --dataset {args.dataset}"
            f"{'' if args.gpu_augment else ' and --no-gpu-augment'}"
        )
    if args.select and (args.dataset not in ("mnist5k", "digits") or args.online_probe):
        raise ExampleError(
            "--select splits the training split of mnist5k or digits, and the online probe would train on the labels "
            f"of the images it scores: use it with --dataset mnist5k or digits and --no-online-probe (got --dataset "
            f"{args.dataset}{' and the online probe' if args.online_probe else ''})"
        )
    if args.compare_to is not None:
        args.compare_to = str(reference_file(args.compare_to, args.dataset))
    missing = missing_packages(args.logger)
    if missing:
        raise ExampleError(
            f"--logger {' '.join(args.logger)} needs {missing}, not installed: pip install {' '.join(missing)}"
        )
    try:
        crop_preset(args.dataset, **crop_settings(args))
    except ValueError as error:
        raise ExampleError(
            f"crop settings (--size-crops, --num-crops, --min/max-scale-crops, --rotation, --elastic-alpha/sigma): "
            f"{error}"
        ) from None


def reference_file(value: str, dataset: str) -> Path:
    """The file of reference curves that ``--compare-to`` names: 'reference' is the shipped one of ``dataset``."""
    if value == "reference":
        path = CONFIGS / "reference" / f"{dataset}.json"
        if not path.is_file():
            shipped = sorted(p.stem for p in (CONFIGS / "reference").glob("*.json"))
            raise ExampleError(
                f"--compare-to reference: no reference curves for --dataset {dataset} (shipped: {shipped})"
            )
        return path
    path = Path(value)
    curves = read_config(path) if path.is_file() else None
    if not isinstance(curves, dict) or not isinstance(curves.get("curves"), dict) or "epochs" not in curves:
        raise ExampleError(
            f"--compare-to '{value}' is not a file of reference curves (write one with reference_curves.py)"
        )
    return path


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings --print-config prints: one JSON object, keys named like the flags (the parser's settings, in
    their order), with the recipe and the seed."""
    return {"recipe": args.recipe, **{key: getattr(args, key, None) for key in args.setting_keys}, "seed": args.seed}


def warn_about_world_size(args: argparse.Namespace) -> None:
    world_size = idist.get_world_size()
    if args.expected_world_size and args.expected_world_size != world_size:
        logging.getLogger("train_swav").warning(
            "the recipe was published for %d processes (global batch %d); this run has %d (global batch %d): "
            "the learning rate is not rescaled",
            args.expected_world_size,
            args.expected_world_size * args.batch_size,
            world_size,
            world_size * args.batch_size,
        )
