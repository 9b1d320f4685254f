"""Reporting helpers the training-side benchmarks share: which commit and machine measured,
and the markdown table they print."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def git_sha() -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    # the load average says whether other processes shared the cores (times and spreads suffer)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads; load average {load} at the end of the run)")


def format_table(rows: list[dict], headers: list[str]) -> str:
    cells = [[str(r.get(h, "")) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
