"""Weights in and out: the released SwAV checkpoints (facebookresearch/swav) into a :class:`SwAVModel`, and the
backbone of a trained model out as a plain state dict for torchvision or timm."""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ignite_swav.checkpoint import is_disk_full, load_checkpoint_file, write_durably
from ignite_swav.modules import SwAVModel, SwAVProjectionHead, SwAVPrototypes, unwrap_model
from ignite_swav.releases import RELEASES, download_release, resnet50_wide

__all__ = ["export_backbone", "load_official_checkpoint"]

_RELEASE_PREFIX = "module."
_WIDE_RESNETS = {"resnet50w2": 2, "resnet50w4": 4, "resnet50w5": 5}
_HEAD = "projection_head."
_PROTOTYPES = "prototypes."
# The reference's head (Linear, BatchNorm1d, ReLU, Linear) has the layout of SwAVProjectionHead's layers.
_HEAD_LAYERS = ("0", "1", "3")


def _state_of(source: str | Path | Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if isinstance(source, (str, Path)):
        state = load_checkpoint_file(source)  # weights_only: no code from the file runs
    elif isinstance(source, Mapping):
        state = source
    else:
        raise TypeError(f"{what} must be a path or a state dict, got {type(source).__name__}")
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} must hold a state dict (a mapping of names to tensors), got {type(state).__name__}")
    return state


def _torchvision_model(arch: str) -> nn.Module:
    from torchvision import models

    if arch in _WIDE_RESNETS:  # the releases' wide ResNet-50s, which torchvision does not build
        return resnet50_wide(_WIDE_RESNETS[arch])

    builder = getattr(models, arch, None) if isinstance(arch, str) else None
    if not callable(builder) or arch.startswith("_") or arch != arch.lower():
        raise ValueError(
            f"arch={arch!r} is not a torchvision model builder, such as 'resnet50' or 'resnet18', nor one of the "
            f"releases' wide ResNet-50s {sorted(_WIDE_RESNETS)}"
        )
    try:
        model = builder()
    except TypeError:  # a callable of torchvision.models that is not a builder (get_model, list_models, ...)
        raise ValueError(
            f"arch={arch!r} is not a torchvision model builder, such as 'resnet50' or 'resnet18'"
        ) from None
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        raise ValueError(f"arch={arch!r}: a ResNet-style torchvision model with an 'fc' classifier is expected")
    return model


def _described(names: list[str], limit: int = 4, quote: bool = True) -> str:
    shown = ", ".join(repr(n) if quote else n for n in names[:limit])
    return f"{shown}{f' and {len(names) - limit} more' if len(names) > limit else ''}"


def load_official_checkpoint(
    source: str | Path | Mapping[str, Any],
    arch: str | None = None,
    *,
    require_head: bool = False,
    prototype_head: int | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> SwAVModel:
    """A :class:`SwAVModel` from a checkpoint released by facebookresearch/swav (``swav_800ep_pretrain.pth.tar``
    and the others), or written by its ``main_swav.py``.

    ``source`` may name a release (``"swav_800ep"``, ``"deepclusterv2_800ep"``, ``"swav_RN50w2_400ep"``: every key
    of :data:`~ignite_swav.RELEASES`): its file is downloaded once into torch's hub cache and checked
    (:func:`~ignite_swav.download_release`, from ``mirror`` when given), and ``arch`` defaults to the release's.

    The format: a flat state dict (or one under ``"state_dict"``), every key prefixed ``module.``; the backbone
    in torchvision's ResNet names (the reference pads the input by 1 and its first convolution by 2, which is
    torchvision's padding of 3); ``projection_head.0`` / ``.1`` / ``.3`` the Linear, BatchNorm1d and Linear of
    the head (or ``projection_head`` a single Linear); ``prototypes.weight`` (3000 x 128 in the releases), or
    ``prototypes.prototypes0.weight``, ... for the several prototype heads of the DeepCluster-v2 and SeLa-v2
    releases (3 heads of 3000), all loaded into one :class:`SwAVPrototypes` of as many heads. The file is read with
    :func:`~ignite_swav.load_checkpoint_file` (``weights_only``: no code in it runs).

    The returned model's backbone is ``torchvision.models.<arch>()`` with ``fc`` replaced by ``nn.Identity``, its
    head a :class:`SwAVProjectionHead` and its prototypes a :class:`SwAVPrototypes`, all filled from the file,
    in eval mode. A release without head or prototypes (such as a backbone-only file) gives a model whose head
    and prototypes are freshly initialised at the releases' sizes (2048 -> 2048 -> 128, 3000), with a warning;
    ``require_head=True`` makes that an error instead.

    Args:
        source: a release's name, the checkpoint file, or its loaded state dict.
        arch: the torchvision builder of the backbone (``"resnet50"``, ``"resnet18"``, ...) or one of the releases'
            wide ResNet-50s (``"resnet50w2"``, ``"resnet50w4"``, ``"resnet50w5"``); default: the release's, else
            ``"resnet50"``.
        require_head: raise when the file holds no projection head or no prototypes.
        prototype_head: keep only this prototype head of a file with several (default: all of them).
        mirror: for a release's name: an address holding the release files, instead of facebookresearch's.
        progress: for a release's name: show the download's progress bar.

    Raises:
        ValueError: the file is not a checkpoint of this format, holds keys that are neither ``arch``'s nor
            the head's, lacks some of them, or has tensors of other shapes (the message names them).

    Example:
        >>> import torch
        >>> from torchvision.models import resnet18
        >>> from ignite_swav import load_official_checkpoint
        >>> released = {f"module.{k}": v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}
        >>> released["module.projection_head.weight"] = torch.randn(16, 512)  # hidden_mlp 0: one Linear
        >>> released["module.projection_head.bias"] = torch.randn(16)
        >>> released["module.prototypes.weight"] = torch.randn(10, 16)
        >>> model = load_official_checkpoint(released, arch="resnet18", require_head=True)
        >>> model.projection.out_dim, model.prototypes.weight.shape
        (16, torch.Size([10, 16]))
    """
    if prototype_head is not None and (
        isinstance(prototype_head, bool) or not isinstance(prototype_head, int) or prototype_head < 0
    ):
        raise ValueError(f"prototype_head must be None (all heads) or an integer >= 0, got {prototype_head!r}")
    if isinstance(source, str) and not Path(source).exists():
        if source in RELEASES:
            arch = arch or RELEASES[source].arch
            source = download_release(source, mirror=mirror, progress=progress)
        elif not any(mark in source for mark in ("/", "\\", ".")):  # a name, not a path
            raise ValueError(
                f"source={source!r} is neither a file nor a release of facebookresearch/swav; the releases: "
                f"{', '.join(RELEASES)}"
            )
    arch = arch or "resnet50"
    state = _state_of(source, "source")
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # a checkpoint of main_swav.py: {"epoch", "state_dict", "optimizer", ...}
    not_names = [k for k in state if not isinstance(k, str)]
    if not_names:
        raise ValueError(
            f"source is not a released SwAV checkpoint: it holds keys that are not names ({not_names[:3]})"
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors or not state:
        what = f"entries that are not tensors ({_described([str(k) for k in not_tensors])})" if state else "nothing"
        raise ValueError(f"source is not a released SwAV checkpoint: it holds {what}")
    weights = {(k[len(_RELEASE_PREFIX) :] if k.startswith(_RELEASE_PREFIX) else k): v for k, v in state.items()}

    backbone = _torchvision_model(arch)
    width = int(cast(nn.Linear, backbone.fc).in_features)
    backbone.fc = nn.Identity()
    expected = backbone.state_dict()
    backbone_weights = {k: v for k, v in weights.items() if not k.startswith((_HEAD, _PROTOTYPES, "projection_head"))}
    missing = [k for k in expected if k not in backbone_weights]
    unknown = [k for k in backbone_weights if k not in expected]
    if missing or unknown:
        parts = [f"keys unknown to torchvision's {arch}: {_described(unknown)}"] if unknown else []
        parts += [f"missing keys of {arch}: {_described(missing)}"] if missing else []
        raise ValueError(f"source does not hold a {arch} backbone in the released SwAV format: {'; '.join(parts)}")
    mismatch = _shape_mismatch(backbone_weights, expected)
    if mismatch:
        key, found, wanted = mismatch
        raise ValueError(
            f"source does not hold a {arch} backbone: '{key}' is {found}, {arch} has {wanted} "
            "(a checkpoint of another architecture?)"
        )
    backbone.load_state_dict(backbone_weights)

    head_weights = {
        k[len("projection_head") :].lstrip("."): v for k, v in weights.items() if k.startswith("projection_head")
    }
    prototype_weights = {k[len(_PROTOTYPES) :]: v for k, v in weights.items() if k.startswith(_PROTOTYPES)}
    absent = [
        name for name, found in (("projection head", head_weights), ("prototypes", prototype_weights)) if not found
    ]
    if absent and require_head:
        raise ValueError(
            f"source holds no {' and no '.join(absent)} (a backbone-only release?); require_head=True asks for them"
        )
    # a head missing from the file is made at the releases' sizes, its output as wide as the prototypes
    out_dim = next((v.shape[-1] for v in prototype_weights.values() if v.ndim == 2), 128)
    projection = _projection_head(head_weights, width, out_dim)
    prototypes = _prototypes(prototype_weights, projection.out_dim, prototype_head)
    if absent:
        logging.getLogger(__name__).warning(
            "the checkpoint holds no %s: initialised at random (%s)", " and no ".join(absent), projection
        )
    return SwAVModel(backbone, projection, prototypes).eval()


def _shape_mismatch(weights: dict[str, Tensor], expected: dict[str, Tensor]) -> tuple[str, tuple, tuple] | None:
    """The first key of ``expected`` whose tensor in ``weights`` has another shape, with both shapes."""
    for key, tensor in expected.items():
        if weights[key].shape != tensor.shape:
            return key, tuple(weights[key].shape), tuple(tensor.shape)
    return None


def _projection_head(head: dict[str, Tensor], width: int, out_dim: int) -> SwAVProjectionHead:
    if not head:
        return SwAVProjectionHead(width, 2048, out_dim)
    if set(head) <= {"weight", "bias"}:  # hidden_mlp 0: one Linear
        projection = SwAVProjectionHead(width, 0, head["weight"].shape[0])
        renamed = {f"layers.{k}": v for k, v in head.items()}
    else:
        first = head.get("0.weight")
        last = head.get("3.weight")
        if first is None or last is None:
            raise ValueError(f"the checkpoint's projection head has keys {_described(sorted(head))}: expected 0/1/3")
        projection = SwAVProjectionHead(width, first.shape[0], last.shape[0])
        renamed = {f"layers.{k}": v for k, v in head.items()}
    expected = projection.state_dict()
    unknown = [f"projection_head.{k[len('layers.') :]}" for k in renamed if k not in expected]
    missing = [f"projection_head.{k[len('layers.') :]}" for k in expected if k not in renamed]
    if unknown or missing:
        raise ValueError(f"the checkpoint's projection head: unknown {unknown}, missing {missing}")
    mismatch = _shape_mismatch(renamed, expected)
    if mismatch:
        key, found, wanted = mismatch
        raise ValueError(
            f"the checkpoint's 'projection_head.{key[len('layers.') :]}' is {found}, expected {wanted} "
            f"for features of width {width}"
        )
    projection.load_state_dict(renamed)
    return projection


def _prototypes(weights: dict[str, Tensor], feat_dim: int, head: int | None) -> SwAVPrototypes:
    if not weights:
        return SwAVPrototypes(feat_dim, 3000)
    if "weight" in weights and len(weights) == 1:
        heads = [weights["weight"]]
        if head not in (None, 0):
            raise ValueError(f"prototype_head={head}, but the checkpoint holds one prototype head (0)")
    else:
        names = [f"prototypes{h}.weight" for h in range(len(weights))]  # MultiPrototypes: prototypes0, 1, ...
        if sorted(weights) != sorted(names):
            raise ValueError(
                f"the checkpoint's prototypes have keys {_described(sorted(weights))}: expected 'weight', or "
                "'prototypes0.weight', 'prototypes1.weight', ... (the layout of several heads)"
            )
        if head is not None and head >= len(names):
            raise ValueError(f"prototype_head={head}, but the checkpoint holds prototype heads 0..{len(names) - 1}")
        heads = [weights[name] for name in names] if head is None else [weights[names[head]]]
    for weight in heads:
        if weight.ndim != 2 or weight.shape[1] != feat_dim:
            raise ValueError(
                f"the checkpoint's prototypes are {tuple(weight.shape)}, expected (K, {feat_dim}) for its embeddings"
            )
        if weight.shape[0] != heads[0].shape[0]:
            raise ValueError(
                f"the checkpoint's prototype heads have different widths {[w.shape[0] for w in heads]}: a "
                "SwAVPrototypes holds heads of one width"
            )
    prototypes = SwAVPrototypes(feat_dim, [w.shape[0] for w in heads] if len(heads) > 1 else heads[0].shape[0])
    prototypes.weight.data.copy_(torch.cat(heads))
    return prototypes


_EXPORT_FORMATS = ("torchvision", "timm")


def export_backbone(
    model_or_checkpoint: nn.Module | str | Path | Mapping[str, Any],
    path: str | Path,
    format: str = "torchvision",
    arch: str | None = None,
) -> dict[str, Tensor]:
    """Write the backbone of a trained SwAV model to ``path`` as a plain ``state_dict`` (``torch.save``), for
    torchvision, timm or detection code, and return it.

    ``model_or_checkpoint``: a :class:`SwAVModel` (also wrapped by DDP or ``torch.compile``), a checkpoint file
    of ``create_swav_trainer`` runs (an Ignite ``Checkpoint`` with a ``"model"`` entry, as the example writes),
    or such a state dict. The backbone's keys lose the ``backbone.`` prefix, so that
    ``torchvision.models.resnet50().load_state_dict(state, strict=False)`` misses exactly ``fc.weight`` and
    ``fc.bias`` (a backbone whose ``fc`` is ``nn.Identity``). timm's ResNets use the same names, and
    ``timm.create_model(name, num_classes=0)`` loads it with ``strict=True``.

    With ``arch`` (a torchvision builder for ``format="torchvision"``, a timm model name for ``"timm"``) the
    state is first loaded into that model, as above, and a mismatch raises before anything is written. The file
    is written atomically and durably (a temporary file flushed, then renamed), readable by all (0644); on a full
    disk an ``OSError`` (ENOSPC) says so and the old file stays.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from torchvision.models import resnet18
        >>> from ignite_swav import SwAVModel, SwAVProjectionHead, SwAVPrototypes, export_backbone
        >>> backbone = resnet18()
        >>> backbone.fc = torch.nn.Identity()
        >>> model = SwAVModel(backbone, SwAVProjectionHead(512, 64, 16), SwAVPrototypes(16, 10))
        >>> state = export_backbone(model, Path(tempfile.mkdtemp()) / "resnet18.pt", arch="resnet18")
        >>> resnet18().load_state_dict(state, strict=False).missing_keys
        ['fc.weight', 'fc.bias']
    """
    if format not in _EXPORT_FORMATS:
        raise ValueError(f"format must be one of {_EXPORT_FORMATS}, got {format!r}")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or a pathlib.Path, got {type(path).__name__}")
    state = _backbone_state(model_or_checkpoint)
    if arch is not None:
        _check_loads(state, format, arch)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path '{path}' is a directory: give the file to write")
    try:
        write_durably(path, lambda temporary: torch.save(state, temporary))  # 0644, as checkpoints are
    except (OSError, RuntimeError) as error:
        if not is_disk_full(error):
            raise
        raise OSError(
            errno.ENOSPC, f"no space left on the device to write '{path}' (the file there, if any, is kept)"
        ) from None
    return state


def _backbone_state(source: nn.Module | str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    if isinstance(source, nn.Module):
        module = unwrap_model(source)
        backbone = getattr(module, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"model_or_checkpoint: a SwAVModel (with a .backbone) is expected, got {type(module).__name__}"
            )
        return {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    state = _state_of(source, "model_or_checkpoint")
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if isinstance(k, str) and k.startswith("backbone.")}
    if not backbone:
        raise ValueError(
            "model_or_checkpoint holds no 'backbone.' weights: give a SwAVModel, or a checkpoint whose 'model' entry "
            "is a SwAVModel's state dict (for a facebookresearch/swav release, load_official_checkpoint it first)"
        )
    if not all(isinstance(v, Tensor) for v in backbone.values()):
        raise ValueError("model_or_checkpoint: the backbone's entries must be tensors")
    return {k: v.clone() for k, v in backbone.items()}


def _check_loads(state: dict[str, Tensor], format: str, arch: str) -> None:
    if format == "torchvision":
        model = _torchvision_model(arch)
        allowed_missing = {"fc.weight", "fc.bias"}
        where = f"torchvision's {arch}"
    else:
        try:
            import timm
        except ImportError:
            raise ValueError("format='timm' needs the package 'timm': pip install 'ignite-swav[lars]'") from None
        try:
            model = timm.create_model(arch, num_classes=0, pretrained=False)
        except RuntimeError as error:  # timm: "Unknown model (...)"
            raise ValueError(f"arch={arch!r} is not a timm model name ({error})") from None
        allowed_missing = set()
        where = f"timm's {arch} (num_classes=0)"
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in allowed_missing]
    unknown = [k for k in state if k not in expected]
    wrong = [
        f"'{k}' {tuple(v.shape)} (not {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unknown or wrong:
        parts = [f"missing {_described(missing)}"] if missing else []
        parts += [f"unknown {_described(unknown)}"] if unknown else []
        parts += [f"other shapes: {_described(wrong, 2, quote=False)}"] if wrong else []
        raise ValueError(f"the backbone does not load into {where}: {'; '.join(parts)}")
