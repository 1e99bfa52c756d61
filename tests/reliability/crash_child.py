"""Child process of test_crash.py: trains the tiny run with a checkpoint every iteration, appending the digest
of the state it is about to save to digests.txt first; optionally kills itself (SIGKILL) in the middle of
writing its N-th checkpoint file.

    python crash_child.py OUTPUT_DIR EPOCHS [KILL_DURING_SAVE_NUMBER]
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from ignite.engine import Events  # noqa: E402
from ignite.handlers import Checkpoint, DiskSaver  # noqa: E402
from tiny_run import build, digest, images  # noqa: E402


def main() -> None:
    output, epochs = Path(sys.argv[1]), int(sys.argv[2])
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.manual_seed(0)
    trainer, to_save, _ = build()
    saves = [0]
    real_save = torch.save

    def save_then_maybe_die(obj, file, *args, **kwargs):
        saves[0] += 1
        if saves[0] != kill_at:
            return real_save(obj, file, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        file.write(data[: len(data) // 2])  # half of the file is on disk when the process dies
        file.flush()
        os.fsync(file.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_then_maybe_die
    checkpoint = Checkpoint(to_save, DiskSaver(output, atomic=True, require_empty=False), n_saved=2)

    @trainer.on(Events.ITERATION_COMPLETED)
    def record_then_save(engine):
        with open(output / "digests.txt", "a") as log:
            log.write(f"{engine.state.iteration} {digest(to_save)}\n")
            log.flush()
            os.fsync(log.fileno())
        checkpoint(engine)

    trainer.run(images(), max_epochs=epochs)


if __name__ == "__main__":
    main()
