"""SwAVLoss's checks of its inputs and the messages of the values it refuses: each names the argument or the crop,
what is wrong and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ignite_swav._distributed import all_reduce, non_finite_on_any_rank

# Embeddings are unit vectors and prototypes unit rows, so scores are cosines in [-1, 1]: a bound known without
# reading the device, from which the Sinkhorn's numerics are chosen. The tolerance covers the rounding of
# bfloat16 / float16 autocast (about 0.4% at most) and nothing a real mistake gives (norms of 10 or 74).
UNIT_TOLERANCE = 0.02
MAX_ABS_SCORE = 1.0 + UNIT_TOLERANCE
# scores / temperature and scores / epsilon must stay finite in float32 (SwAV uses 0.1 and 0.05)
SMALLEST_DIVISOR = 1e-30


def check_inputs(
    embeddings: Sequence[Tensor],
    scores: Sequence[Tensor],
    prototypes: Tensor,
    crops_for_assign: tuple[int, ...],
    queue: Tensor | None,
) -> int:
    """The batch size of a call of the loss, or a ``TypeError`` / ``ValueError`` naming the argument that is wrong."""
    for name, value in (("scores", scores), ("embeddings", embeddings)):
        if isinstance(value, Tensor) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list with one tensor per crop, got {type(value).__name__}")
        for v, t in enumerate(value):
            if not isinstance(t, Tensor) or t.ndim != 2:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}[{v}] must be a 2-D tensor (batch, width), got {shape}")
    refuse_the_old_order(embeddings, scores, prototypes)
    if len(scores) != len(embeddings):
        raise ValueError(
            f"scores and embeddings must have one entry per crop each, got {len(scores)} scores and "
            f"{len(embeddings)} embeddings"
        )
    if len(scores) < 2:
        raise ValueError(f"SwAV needs at least 2 crops (one to assign, one to predict it), got {len(scores)}")
    missing = [c for c in crops_for_assign if c >= len(scores)]
    if missing:
        raise ValueError(
            f"crops_for_assign={crops_for_assign} names crop(s) {missing}, but the loss was given "
            f"{len(scores)} crops (valid indices 0..{len(scores) - 1})"
        )
    batch_size, num_prototypes = scores[0].shape
    feat_dim = embeddings[0].shape[1]
    if batch_size == 0:
        raise ValueError("scores[0] has an empty batch: the loss needs at least one sample")
    for v, (s, z) in enumerate(zip(scores, embeddings)):
        if s.shape != (batch_size, num_prototypes):
            raise ValueError(
                f"scores[{v}] has shape {tuple(s.shape)}, but scores[0] has {(batch_size, num_prototypes)}: "
                "every crop needs the same batch size and number of prototypes"
            )
        if z.shape != (batch_size, feat_dim):
            raise ValueError(
                f"embeddings[{v}] has shape {tuple(z.shape)}, expected {(batch_size, feat_dim)} "
                "(the batch size of the scores and the width of embeddings[0])"
            )
        if not s.is_floating_point() or not z.is_floating_point():
            raise TypeError(f"scores[{v}] and embeddings[{v}] must be floating point, got {s.dtype}, {z.dtype}")
    if not isinstance(prototypes, Tensor) or prototypes.ndim not in (2, 3):
        raise ValueError(
            "prototypes must be a (K, D) tensor, or (H, K, D) for H heads, got "
            f"{getattr(prototypes, 'shape', prototypes)}"
        )
    if prototypes.shape[-1] != feat_dim:
        raise ValueError(
            f"prototypes have width {prototypes.shape[-1]} (shape {tuple(prototypes.shape)}), but the "
            f"embeddings have width {feat_dim}: they must match"
        )
    rows = prototypes.shape[:-1].numel()
    if rows != num_prototypes:
        raise ValueError(
            f"prototypes have {rows} rows (shape {tuple(prototypes.shape)}), but the scores have {num_prototypes} "
            "columns: one score per prototype is expected"
        )
    if scores[0].device.type == "meta":
        raise ValueError("scores are on the 'meta' device, which holds no values: the loss needs real tensors")
    if queue is not None:
        expected = (len(crops_for_assign), feat_dim)
        if queue.ndim != 3 or (queue.shape[0], queue.shape[2]) != expected:
            raise ValueError(
                f"queue has shape {tuple(queue.shape)}, expected ({expected[0]}, length, {expected[1]}) "
                f"(one slot per assigned crop, rows as wide as the embeddings, which have width {feat_dim}): "
                "a SwAVQueueHandler's feat_dim must be the width of the embeddings"
            )
        if queue.shape[1] == 0:
            raise ValueError("queue has length 0: set queue to None to train without a queue")
        if queue.device != embeddings[0].device:
            raise ValueError(
                f"queue is on {queue.device}, the embeddings on {embeddings[0].device}: the queue must be on the "
                "training device (SwAVQueueHandler creates it on idist.device())"
            )
    return batch_size


def bad_values_message(
    all_scores: Tensor, embeddings: Tensor, prototypes: Tensor | None, crops_for_assign: tuple[int, ...]
) -> str:
    """The message of a call the checks refused, naming the crop and the fix (reads the device; a collective: every
    rank calls it together, after reading the same verdict)."""
    named = [(f"scores[{v}]", s) for v, s in enumerate(all_scores)]
    named += [(f"embeddings[{c}]", z) for c, z in zip(crops_for_assign, embeddings)]
    non_finite = non_finite_on_any_rank([t for _, t in named])
    bad = [name for (name, _), flag in zip(named, non_finite) if flag]
    if bad:
        where = f"non-finite values (NaN or inf) in {', '.join(bad)}: the model's output diverged"
    else:
        where = _out_of_range(all_scores, embeddings, prototypes, crops_for_assign)
    return f"{where} (on this rank or another one); the queue was left unchanged"


def _out_of_range(
    all_scores: Tensor, embeddings: Tensor, prototypes: Tensor | None, crops_for_assign: tuple[int, ...]
) -> str:
    """The message for finite values outside SwAV's contract (read from the device: an error path)."""
    norms = torch.linalg.vector_norm(embeddings.float(), dim=2)
    deviation = all_reduce(norms.sub(1).abs().amax(dim=1), op="MAX")
    for c, d, z_norms in zip(crops_for_assign, deviation.tolist(), norms):
        if d > UNIT_TOLERANCE:
            return (
                f"embeddings[{c}] are not unit vectors (norms from {float(z_norms.min()):.3g} to "
                f"{float(z_norms.max()):.3g}): SwAV's embeddings must be L2-normalised, e.g. "
                "F.normalize(z, dim=1) at the end of the projection head (as SwAVProjectionHead does)"
            )
    largest = all_reduce(all_scores.abs().flatten(1).amax(dim=1).float(), op="MAX")
    for v, value in enumerate(largest.tolist()):
        if value > MAX_ABS_SCORE:
            return (
                f"scores[{v}] reach {value:.3g} in magnitude, beyond the cosine range [-1, 1]: SwAV's scores must "
                "be unit embeddings times L2-normalised prototypes (create_swav_trainer normalises the "
                "prototype layer before every step; SwAVPrototypes.normalize_() does it by hand)"
            )
    if prototypes is not None:
        norms = torch.linalg.vector_norm(prototypes.float(), dim=-1)
        return (
            f"the prototypes are not unit rows (norms from {float(norms.min()):.3g} to {float(norms.max()):.3g}) "
            "while they score the queue: normalise them before every step (create_swav_trainer does; "
            "SwAVPrototypes.normalize_() by hand)"
        )
    return "non-finite values (NaN or inf) in the loss although the scores are finite: the temperature is too small"


def refuse_the_old_order(embeddings: Sequence[Tensor], scores: Sequence[Tensor], prototypes: Any) -> None:
    """A call in the positional order of 0.x, ``(scores, embeddings, prototypes)``, told by the widths (scores are
    as wide as the prototypes are many, embeddings as the prototypes are wide): a ``TypeError`` saying so, rather
    than a confusing complaint about the values."""
    if not (isinstance(prototypes, Tensor) and prototypes.ndim in (2, 3) and embeddings and scores):
        return
    rows, width = prototypes.shape[:-1].numel(), prototypes.shape[-1]
    if rows != width and embeddings[0].shape[1] == rows and scores[0].shape[1] == width:
        raise TypeError(
            "SwAVLoss takes (embeddings, scores, prototypes) since 1.0, the order of SwAVModel's output; this call "
            "gave the scores first (the order of 0.x): pass them by keyword, loss_fn(embeddings=..., scores=..., "
            "prototypes=...)"
        )
