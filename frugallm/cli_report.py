"""The `frugallm report` command's handler and flags (report/, docs/report.md), in cli.py's table form;
beside cli.py so that it stays within the file size the architecture allows."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_args import arg


def report(args: argparse.Namespace) -> int:
    from .report import run_report, select
    from .train.config import duration_seconds

    done = run_report(select(args.only), duration_seconds(args.budget), Path(args.out), redo=args.redo)
    print(f"wrote {Path(args.out) / 'report.html'} and report.md: {len(done)} sections")
    return 0


REPORT_COMMANDS = [
    (("report",), "run DeepSeek's claims as small experiments on this host and write one report (HTML and "
                  "Markdown) with tables, plots and a verdict per claim", report, [
        arg("--budget", default="30m", help="wall-clock time for the whole report, e.g. 90s, 20m, 1h; each "
            "experiment is sized from measured throughput to fit its share (default 30m)"),
        arg("--out", default="report", help="output directory: report.html, report.md, plots/, cache/ "
            "(default ./report)"),
        arg("--only", help="comma-separated section names to run, e.g. moe_balance,mhc (default: every section; "
            "the names are listed in docs/report.md)"),
        arg("--redo", action="store_true", help="measure again even where this host's cached finding exists"),
    ]),
]
