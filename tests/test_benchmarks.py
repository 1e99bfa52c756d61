"""The benchmark scripts run end to end on tiny settings (their figures are not checked: timing goals live in
BENCHMARKS.md, measured by hand)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=300, cwd=BENCHMARKS
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_loss_benchmark_prints_a_row_with_equal_losses():
    out = run_script("loss.py", "--repeats", "1")
    assert "machine:" in out and "ignite-swav" in out
    row = out.strip().splitlines()[-1].split()
    assert row[:3] == ["64", "3840", "3000"] and float(row[-1]) < 1e-4


def test_step_benchmark_prints_the_overhead():
    out = run_script(
        "step.py",
        "--batch-sizes",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--num-prototypes",
        "16",
        "--queue-length",
        "8",
    )
    assert out.strip().splitlines()[-1].split()[0] == "4" and out.strip().endswith("%")


@pytest.mark.soak  # long (multi-process or a full script): make test-soak, in CI
def test_handler_benchmark_on_two_processes():
    out = run_script("handler.py", "--queue-lengths", "128", "--repeats", "1", "--feat-dim", "8")
    assert "2x128x8" in out


@pytest.mark.soak  # long (multi-process or a full script): make test-soak, in CI
def test_sweep_saves_a_plot(tmp_path: Path):
    pytest.importorskip("matplotlib")
    out = run_script(
        "sweep.py",
        "--queue-lengths",
        "0",
        "128",
        "--num-prototypes",
        "16",
        "--repeats",
        "1",
        "--output",
        str(tmp_path / "s.png"),
    )
    assert (tmp_path / "s.png").stat().st_size > 0 and "plot saved" in out


@pytest.mark.soak  # long (multi-process or a full script): make test-soak, in CI
def test_augment_benchmark_with_training():
    out = run_script(
        "augment.py",
        "--preset", "cifar", "--image-size", "32", "32", "--images", "16", "--batch-size", "8",
        "--batches", "1", "--repeats", "1", "--workers", "0", "--train",
    )  # fmt: skip
    assert "BatchedMultiCrop alone" in out and "training resnet18" in out


@pytest.mark.soak  # long (multi-process or a full script): make test-soak, in CI
def test_arch_benchmark_prints_a_rate_per_backbone():
    out = run_script("arch.py", "--batch-size", "4", "--steps", "1")
    rows = [line for line in out.splitlines() if "resnet" in line]
    assert len(rows) == 6 and all(float(row.split()[-1]) > 0 for row in rows)
    assert "global pool" in out  # the pooling the default replaced, measured beside it


def test_monitors_benchmark_prints_the_share_of_a_step_of_the_monitor_and_the_probe():
    out = run_script("monitors.py", "--repeats", "1", "--batch-size", "8")
    assert "% of a step" in out and "prototype_usage" in out and "online probe" in out
