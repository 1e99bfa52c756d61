"""What a benchmark ran on, printed with its figures."""

from __future__ import annotations

import datetime
import platform

import torch


def describe(device: torch.device | str = "cpu") -> str:
    """One line: the device (GPU name, or CPU and threads), torch's version and today's date."""
    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"machine: {where}, torch {torch.__version__}, {datetime.date.today()}"
