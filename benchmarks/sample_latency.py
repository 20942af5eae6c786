"""Sampling latency in one table: TransDiff with / without MRAR (`benchmarks/latency_transdiff.py`) and D-AR with /
without the KV cache, GPT tokens + tokenizer decode (`benchmarks/latency_dar.py`). Random weights.

    python -m benchmarks.sample_latency --quick                      # fewer rows / measured steps
    python -m benchmarks.sample_latency --json sample_latency.json   # everything (slow on CPU)

How each number is measured (and when it is extrapolated) is described in the two source modules.
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks import latency_dar, latency_transdiff
from benchmarks.common import report

SOURCES = {"TransDiff": latency_transdiff, "D-AR": latency_dar}


def rows(quick: bool = True, only: str | None = None) -> list[dict]:
    """The rows of every source (or of the family named `only`), each tagged with its family."""
    if only is not None and only not in SOURCES:
        raise ValueError(f"unknown family {only!r}: use one of {list(SOURCES)}")
    out = []
    for family, module in SOURCES.items():
        if only in (None, family):
            out += [{"family": family, **row} for row in module.rows(quick)]
    return out


def columns(table: list[dict]) -> list[str]:
    """Union of the row keys, in first-seen order (the two sources report different fields)."""
    return list(dict.fromkeys(key for row in table for key in row))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the sources' quick settings (fewer rows and steps)")
    p.add_argument("--only", choices=list(SOURCES), help="one family only")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", default="sample_latency.json", help="where to write the rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.threads} threads, load average {load}", flush=True)
    table = rows(args.quick, args.only)
    report(table, args.json, "Sampling latency (seconds per image unless a column says otherwise)", columns(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
