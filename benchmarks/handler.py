#!/usr/bin/env python
"""The queue handler's own cost per epoch on 2 gloo processes: gathering the queue of both ranks (``gather``,
the collective it runs at ``gather_event`` for ``state_dict``) and writing it through Ignite's ``Checkpoint`` with
an atomic ``DiskSaver`` (what ``SwAVQueueHandler.save_queue_file`` does), then loading it back and resharding it.

    python benchmarks/handler.py                     # global queues of 2x3840x128 and 2x65536x128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from _machine import describe
from ignite.engine import Engine

from ignite_swav import SwAVLoss, SwAVQueueHandler, load_checkpoint_file


def _measure(local_rank: int, queue_lengths: list[int], feat_dim: int, repeats: int, workdir: str) -> None:
    world_size, rank = idist.get_world_size(), idist.get_rank()
    if rank == 0:
        print(describe("cpu"))
        print(f"{world_size} gloo processes; median of {repeats} epochs (ms); files in {workdir}")
        print(f"{'global queue':>16} {'file MB':>8} {'gather':>8} {'gather+write':>13} {'load+reshard':>13}")
    for length in queue_lengths:
        loss = SwAVLoss()
        handler = SwAVQueueHandler(
            loss, queue_length=length, epoch_queue_starts=0, batch_size=64, feat_dim=feat_dim, dirname=workdir
        )
        engine = Engine(lambda e, b: None)
        handler.queue.rows = F.normalize(torch.randn(2, length // world_size, feat_dim), dim=2)
        gather, write, load = [], [], []
        for epoch in range(1, repeats + 2):  # the first epoch warms up
            engine.state.epoch, engine.state.iteration = epoch, epoch * 100
            idist.barrier()
            start = time.perf_counter()
            handler.gather(engine)
            state = handler.state_dict()
            gather.append(time.perf_counter() - start)
            idist.barrier()
            start = time.perf_counter()
            handler.save_queue_file(engine)
            idist.barrier()
            write.append(time.perf_counter() - start)
            path = Path(workdir) / f"swav_queue_{epoch * 100}.pt"
            start = time.perf_counter()
            handler.load_state_dict(load_checkpoint_file(path))
            load.append(time.perf_counter() - start)
        if rank == 0:
            megabytes = path.stat().st_size / 2**20
            cells = [statistics.median(t[1:]) * 1000 for t in (gather, write, load)]
            print(f"{f'2x{length}x{feat_dim}':>16} {megabytes:8.1f} {cells[0]:8.1f} {cells[1]:13.1f} {cells[2]:13.1f}")
            assert state["queue"].shape == (2, length, feat_dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queue-lengths", type=int, nargs="+", default=[3840, 65536])
    parser.add_argument("--feat-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        with idist.Parallel(backend="gloo", nproc_per_node=args.nproc) as parallel:
            parallel.run(_measure, args.queue_lengths, args.feat_dim, args.repeats, workdir)


if __name__ == "__main__":
    main()
