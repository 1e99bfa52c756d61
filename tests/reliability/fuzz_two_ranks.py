"""Runs the fuzz cases on 2 gloo processes: both ranks draw the same settings (derandomised hypothesis, no
shrinking), each its own data. A case that fails on one rank only would leave the other waiting in a
collective: the caller runs this script with a timeout.

    python fuzz_two_ranks.py MAX_EXAMPLES OUTPUT_DIR     # writes rank0.json and rank1.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import ignite.distributed as idist  # noqa: E402
from fuzz_cases import cases, run_case  # noqa: E402
from helpers import spawn_gloo  # noqa: E402
from hypothesis import Phase, given, settings  # noqa: E402


def worker(local_rank: int, max_examples: int, output_dir: str) -> None:
    outcomes: list[str] = []

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate])
    @given(case=cases)
    def check(case):
        outcomes.append(run_case(case))

    check()
    (Path(output_dir) / f"rank{idist.get_rank()}.json").write_text(json.dumps(outcomes))


if __name__ == "__main__":
    spawn_gloo(worker, int(sys.argv[1]), sys.argv[2])
