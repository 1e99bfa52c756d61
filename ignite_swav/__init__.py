"""ignite-swav: SwAV self-supervised learning for PyTorch-Ignite."""

from ignite_swav.loss import SwAVLoss
from ignite_swav.queue import SwAVQueueHandler, load_checkpoint_file
from ignite_swav.sinkhorn import sinkhorn

__version__ = "0.1.0"

__all__ = ["SwAVLoss", "SwAVQueueHandler", "__version__", "load_checkpoint_file", "sinkhorn"]
