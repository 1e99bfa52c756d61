"""Input fuzzing of the loss and the queue handler on 1 and 2 processes: every drawn setting gives a valid
result or an explained error from ignite_swav, never a crash from deep inside torch, never a hang."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_cases import cases, run_case
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.slow


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_one_process(case):
    assert run_case(case) in ("valid", "refused")


@pytest.mark.soak  # long (multi-process or a full script): make test-soak, in CI
def test_two_processes_draw_the_same_cases_and_never_hang(tmp_path: Path):
    script = Path(__file__).with_name("fuzz_two_ranks.py")
    command = [sys.executable, str(script), "80", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)  # a hang fails here
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes[0] == outcomes[1]  # case by case, both ranks agreed: valid, or refused
    assert len(outcomes[0]) == 80
    assert outcomes[0].count("valid") >= 10 and outcomes[0].count("refused") >= 10, outcomes
