"""A linear classifier trained beside SwAV on the backbone's features, to see linear accuracy while pretraining."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from ignite import distributed as idist
from ignite.base import Serializable
from ignite.engine import Engine, Events, _prepare_batch
from ignite.metrics import Accuracy
from torch import Tensor, nn

from ignite_swav._batches import split_batch
from ignite_swav._distributed import all_reduce, broadcast
from ignite_swav._state_checks import check_optimizer_state
from ignite_swav._validation import check_int, check_positive_float
from ignite_swav._wrappers import restore_modes, training_modes
from ignite_swav.modules import unwrap_model

__all__ = ["OnlineLinearProbe"]


_IGNORED = -100  # cross-entropy's ignore_index for the labels the probe does not train on


def _labels_of_batch(batch: Any) -> Any:
    return split_batch(batch)[1]


class OnlineLinearProbe(Serializable):
    """A linear classifier on the detached backbone features of the first crop, trained at every iteration of
    the SwAV trainer with its own optimizer on the batch's labels (no gradient reaches the backbone, and its
    parameters are not the SwAV optimizer's), evaluated as an Ignite metric.

    ``attach(trainer)`` puts a forward hook on the backbone that keeps the features of its first call in each
    iteration (SwAVModel runs the large crops first; the first ``B`` rows are the first crop), then after the
    step trains the classifier on them, L2-normalised, against ``label_fn(trainer)`` (by default the target of
    the trainer's ``(crops, target)`` batch) with cross-entropy and Adam. On several processes the classifier's
    gradients are averaged over the ranks, so every rank holds the same classifier. Nothing is read from the
    device in a step: labels of -1 (unlabelled images, as STL-10 marks them) are not trained on, and any other
    label outside ``0..num_classes-1`` is not trained on either and raises at the end of the epoch, on every rank
    at once (:meth:`check_labels`).

    Its accuracy: :meth:`attach_metric` adds an ``Accuracy`` to an evaluator whose output is ``(features,
    labels)``, such as :func:`~ignite_swav.create_knn_evaluator`'s (the k-NN pass then scores the probe too), and
    :meth:`create_evaluator` builds a small evaluator of its own. It is :class:`Serializable`: put it in the
    ``Checkpoint`` to resume it.

    Args:
        backbone: the backbone of the SwAV model (``SwAVModel.backbone``), whose output is ``(N, F)`` features
            (or ``(N, F, 1, 1)``).
        num_classes: number of classes of the labels.
        lr: learning rate of the classifier's Adam.
        weight_decay: weight decay of the classifier's Adam.
        label_fn: ``engine -> labels`` of the current iteration.

    Example:
        >>> import torch
        >>> from ignite_swav import OnlineLinearProbe, SwAVLoss, SwAVModel, SwAVProjectionHead, SwAVPrototypes
        >>> from ignite_swav import create_swav_trainer
        >>> backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))
        >>> model = SwAVModel(backbone, SwAVProjectionHead(8, 16, 4), SwAVPrototypes(4, 10))
        >>> trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), SwAVLoss())
        >>> probe = OnlineLinearProbe(model.backbone, num_classes=3)
        >>> probe.attach(trainer)
        >>> crops = [torch.randn(4, 3, 16, 16)] * 2
        >>> _ = trainer.run([(crops, torch.tensor([0, 1, 2, 0]))] * 2, max_epochs=1)
        >>> heldout = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))]
        >>> 0 <= probe.create_evaluator().run(heldout).metrics["online_linear_top1"] <= 1
        True
    """

    _state_dict_all_req_keys = ("classifier", "optimizer")

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        label_fn: Callable[[Engine], Any] = lambda engine: _labels_of_batch(engine.state.batch),
    ) -> None:
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module (SwAVModel.backbone), got {type(backbone).__name__}")
        self.backbone = backbone
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.lr = check_positive_float("lr", lr)
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        self.weight_decay = float(weight_decay)
        if not callable(label_fn):
            raise TypeError(f"label_fn must be callable (engine -> labels), got {type(label_fn).__name__}")
        self.label_fn = label_fn
        #: the classifier (a Linear on L2-normalised features), created at the first features
        self.classifier: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._first_features = _FirstFeatures()
        self._label_counts: Tensor | None = None  # this epoch's bad and known labels, counted on the device
        self._attached = False  # not the trainer itself: it holds this probe's methods (a reference cycle)

    def attach(self, trainer: Engine) -> None:
        """Train the probe at every iteration of ``trainer`` (the engine that runs ``backbone``)."""
        if not isinstance(trainer, Engine):
            raise TypeError(f"trainer must be an ignite Engine, got {type(trainer).__name__}")
        if self._attached:
            raise ValueError("this OnlineLinearProbe is already attached; make one per trainer")
        self._attached = True
        unwrap_model(self.backbone).register_forward_hook(self._first_features)
        trainer.add_event_handler(Events.ITERATION_STARTED, self._arm)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.train_step)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.check_labels)

    def _arm(self, _: Engine) -> None:
        self._first_features.armed, self._first_features.features = True, None

    def _build(self, in_features: int, device: torch.device, same_start: bool = True) -> None:
        # Made in the first iteration: a draw from the global stream there would change every later crop and
        # batch order, so that attaching the probe would change what SwAV trains.
        with torch.random.fork_rng(devices=[]):
            self.classifier = nn.Linear(in_features, self.num_classes).to(device)
        if same_start and idist.get_world_size() > 1:  # the same start on every rank (every rank builds it here)
            for parameter in self.classifier.parameters():
                parameter.data.copy_(broadcast(parameter.data, src=0))
        self.optimizer = torch.optim.Adam(self.classifier.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def train_step(self, engine: Engine) -> None:
        """``ITERATION_COMPLETED``: one optimizer step of the classifier on this iteration's first crop."""
        labels = self.label_fn(engine)
        if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point:
            described = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            described = "no labels in the trainer's batch" if labels is None else described
            raise ValueError(
                f"OnlineLinearProbe needs a 1-D tensor of integer labels for each batch, got {described}: attach it "
                "only when the data set has labels (or pass label_fn)"
            )
        features = self._first_features.features
        self._first_features.features = None
        if features is None:
            raise ValueError(
                "OnlineLinearProbe saw no call of its backbone in this iteration: attach it to the trainer that "
                "runs that backbone"
            )
        features = features.flatten(1)
        batch = labels.shape[0]
        if batch == 0 or features.shape[0] % batch != 0:
            raise ValueError(
                f"the backbone's first call gave {features.shape[0]} rows for a batch of {batch} labels: expected a "
                "multiple (the first crops of the batch, concatenated)"
            )
        if self.classifier is None:
            self._build(features.shape[1], features.device)
        assert self.classifier is not None and self.optimizer is not None
        if self.classifier.in_features != features.shape[1]:
            raise ValueError(
                f"the probe's classifier takes {self.classifier.in_features} features (a restored state?), the "
                f"backbone gives {features.shape[1]}: it belongs to another backbone"
            )
        labels = labels.to(features.device)
        # Checked on the device, never here: a label of -1 (STL-10's unlabelled images) is ignored; any other label
        # outside 0..num_classes-1 is ignored too and reported at the end of the epoch, on every rank at once.
        known = (labels >= 0) & (labels < self.num_classes)
        # per epoch: [labels outside -1..num_classes-1, labels trained on]
        counts = torch.stack([((labels < -1) | (labels >= self.num_classes)).sum(), known.sum()]).float()
        self._label_counts = counts if self._label_counts is None else self._label_counts + counts
        with torch.enable_grad():
            self.classifier.train()
            logits = self.classifier(F.normalize(features[:batch].float(), dim=1))
            targets = torch.where(known, labels, _IGNORED)
            losses = F.cross_entropy(logits, targets, ignore_index=_IGNORED, reduction="sum")
            loss = losses / known.sum().clamp_min(1)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if idist.get_world_size() > 1:
            for parameter in self.classifier.parameters():
                if parameter.grad is not None:
                    parameter.grad = all_reduce(parameter.grad) / idist.get_world_size()
        self.optimizer.step()

    def check_labels(self, engine: Engine | None = None) -> None:
        """``EPOCH_COMPLETED``: raise, on every rank at once, when a label outside ``-1..num_classes-1`` came in
        the epoch on any rank (those were not trained on), or when no rank had a labelled image (one all-reduce
        and one read per epoch)."""
        counts, self._label_counts = self._label_counts, None
        if counts is None:
            counts = torch.zeros(2, device=idist.device())
        if idist.get_world_size() > 1:
            counts = all_reduce(counts, op="SUM")
        out_of_range, known = counts.tolist()
        epoch = engine.state.epoch if engine is not None else "?"
        if out_of_range:
            raise ValueError(
                f"OnlineLinearProbe(num_classes={self.num_classes}) got {int(out_of_range)} label(s) outside "
                f"0..{self.num_classes - 1} in epoch {epoch} (on this rank or another one): pass the data set's "
                "number of classes; -1 marks an unlabelled image (as STL-10 does), which is not trained on"
            )
        if not known:
            raise ValueError(
                f"OnlineLinearProbe saw no labelled image in epoch {epoch} (every label was -1, unlabelled): attach "
                "it only when the data set has labels"
            )

    @torch.no_grad()
    def predict(self, features: Tensor) -> Tensor:
        """Class logits of ``(N, F)`` backbone features (normalised here, as in training)."""
        if self.classifier is None:
            raise RuntimeError("OnlineLinearProbe has not been trained yet: attach it to the trainer and run it")
        return self.classifier(F.normalize(features.flatten(1).float(), dim=1).to(self.classifier.weight.device))

    def attach_metric(
        self,
        evaluator: Engine,
        name: str = "online_linear_top1",
        output_transform: Callable[[Any], tuple[Tensor, Tensor]] = lambda output: output,
    ) -> None:
        """Add the probe's top-1 as ``evaluator.state.metrics[name]``; ``output_transform`` maps the evaluator's
        output to ``(features, labels)`` (the identity for :func:`~ignite_swav.create_knn_evaluator`)."""

        def logits_and_labels(output: Any) -> tuple[Tensor, Tensor]:
            features, labels = output_transform(output)
            logits = self.predict(features)
            return logits, labels.to(logits.device)

        Accuracy(output_transform=logits_and_labels).attach(evaluator, name)

    def create_evaluator(
        self,
        device: str | torch.device | None = None,
        prepare_batch: Callable[..., Any] = _prepare_batch,
        name: str = "online_linear_top1",
    ) -> Engine:
        """An evaluator of the probe: ``evaluator.run(data).metrics[name]`` is its top-1 on ``data`` (batches
        that ``prepare_batch`` turns into ``(images, labels)``), the backbone in eval mode (the mode of each of its
        modules restored after)."""

        @torch.no_grad()
        def step(engine: Engine, batch: Any) -> tuple[Tensor, Tensor]:
            x, y = prepare_batch(batch, device=device, non_blocking=False)
            return self.backbone(x), y

        evaluator = Engine(step)
        modes: dict[nn.Module, bool] = {}
        evaluator.add_event_handler(Events.STARTED, lambda _: modes.update(training_modes(self.backbone)))
        evaluator.add_event_handler(Events.STARTED, lambda _: self.backbone.eval())
        evaluator.add_event_handler(Events.COMPLETED, lambda _: restore_modes(modes))
        self.attach_metric(evaluator, name)
        return evaluator

    def state_dict(self) -> OrderedDict[str, Any]:
        """The classifier's and its optimizer's state (``None`` before the first step)."""
        return OrderedDict(
            classifier=None if self.classifier is None else self.classifier.state_dict(),
            optimizer=None if self.optimizer is None else self.optimizer.state_dict(),
        )

    def validate_state_dict(self, state_dict: Any) -> None:
        """Check ``state_dict`` as :meth:`load_state_dict` would, changing nothing."""
        Serializable.load_state_dict(self, state_dict)  # Ignite's checks: a mapping with the required keys
        classifier = state_dict["classifier"]
        if classifier is None:
            return
        weight = classifier.get("weight") if isinstance(classifier, Mapping) else None
        bias = classifier.get("bias") if isinstance(classifier, Mapping) else None
        if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[0] != self.num_classes:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else None
            raise ValueError(
                f"the probe's state holds a classifier of shape {shape}, expected ({self.num_classes}, features)"
            )
        if not isinstance(bias, Tensor) or bias.shape != (self.num_classes,) or set(classifier) != {"weight", "bias"}:
            raise ValueError(f"the probe's classifier state must hold 'weight' and a ({self.num_classes},) 'bias'")
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise ValueError("the probe's classifier holds NaN or infinite values")
        if self.classifier is not None and weight.shape[1] != self.classifier.in_features:
            raise ValueError(
                f"the probe's state holds a classifier of {weight.shape[1]} features, this probe's backbone gives "
                f"{self.classifier.in_features}: it belongs to another backbone"
            )
        optimizer = state_dict["optimizer"]
        if optimizer is not None:
            # the optimizer of a classifier of the saved shape: the saved buffers must fit it
            shaped = nn.Linear(weight.shape[1], self.num_classes, device="meta")
            try:
                check_optimizer_state("optimizer", torch.optim.Adam(shaped.parameters()), optimizer)
            except ValueError as error:
                raise ValueError(f"the probe's {str(error).removeprefix('checkpoint entry ')}") from None

    def load_state_dict(self, state_dict: Any) -> None:
        """Restore :meth:`state_dict` (the classifier is created with the saved width)."""
        self.validate_state_dict(state_dict)
        classifier = state_dict["classifier"]
        if classifier is None:
            self.classifier = self.optimizer = None
            return
        weight = classifier["weight"]
        device = next((p.device for p in self.backbone.parameters()), torch.device("cpu"))
        self._build(weight.shape[1], device, same_start=False)  # no collective in a load: the state sets it
        assert self.classifier is not None and self.optimizer is not None
        self.classifier.load_state_dict(classifier)
        if state_dict["optimizer"] is not None:
            self.optimizer.load_state_dict(state_dict["optimizer"])


class _FirstFeatures:
    """The backbone's forward hook: keeps its first output once armed. An object of its own, not a method of the
    probe: the backbone holding the probe, which holds the backbone, would be a reference cycle keeping the model
    until the garbage collector runs."""

    def __init__(self) -> None:
        self.armed = False
        self.features: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.armed and isinstance(output, Tensor):
            self.armed, self.features = False, output.detach()
