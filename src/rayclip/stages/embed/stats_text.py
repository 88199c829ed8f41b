"""Figures read from Ray Data's stats text (ds.stats()), which has no structured form."""

from __future__ import annotations

import re


def tasks_executed(stats_text: str, operator: str) -> int:
    """Tasks the operator executed, from Ray Data's stats text."""
    match = re.search(rf"Operator \d+ [^\n]*{re.escape(operator)}[^\n]*: (\d+) tasks executed", stats_text)
    return int(match.group(1)) if match else 0


def remote_wall_s(stats_text: str, operator: str) -> float:
    """The operator's remote wall time summed over its tasks, from Ray Data's stats text."""
    section = re.search(rf"Operator \d+ [^\n]*{re.escape(operator)}.*?(?=\nOperator \d|\Z)", stats_text, re.S)
    total = re.search(r"Remote wall time: .*?([\d.]+)(ms|s|us) total", section.group(0)) if section else None
    if not total:
        return 0.0
    return float(total.group(1)) / {"s": 1, "ms": 1e3, "us": 1e6}[total.group(2)]
