"""The report's two renderings, one content: report.md (plots linked beside it) and report.html (one
self-contained file, plots embedded as base64 PNG). Sections in order, a summary table first."""

from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path


def _cell(x) -> str:
    if isinstance(x, float):
        return f"{x:,.4g}"
    return str(x)


def summary_rows(done) -> list[list[str]]:
    return [[s.title, s.claim, f.measured, f.verdict] for s, f in done]


def context_line(host: dict, budget_s: float, context: dict) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"Host: {host['cpu']}; flags {' '.join(host['flags'])}; torch {host['torch']}; profile {host['profile']}; "
            f"{context.get('cores', '?')} cores, {context.get('threads', 1)} torch thread; load average "
            f"{context.get('load', float('nan')):.1f} at the start (a load above the core count means other jobs "
            f"shared the cores, and every speed here is lower than a quiet host's). Written {when}; budget "
            f"{budget_s / 60:.1f} min, this run {context.get('wall_s', 0) / 60:.1f} min (cached sections cost none).")


def markdown(done, host: dict, budget_s: float, context: dict | None = None) -> str:
    lines = [f"# frugallm report: DeepSeek's claims, measured here", "", context_line(host, budget_s, context or {}),
             "", "Each section: `frugallm report --only NAME` reproduces it alone; docs/report.md gives its "
             "verdict rule.", "",
             "| claim | paper | measured here | verdict |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in summary_rows(done)]
    for s, f in done:
        lines += ["", f"## {s.title}", "", f"**Paper:** {s.claim}", "", f"**Measured here:** {f.measured}", "",
                  f"**Verdict:** {f.verdict}. {f.why}", "", f"**Set-up:** {f.setup}" + (f" ({f.scale})" if f.scale else ""),
                  "", f"**Reproduce alone:** `{s.command}` ({f.seconds:.0f} s here)"]
        if f.rows:
            lines += ["", "| " + " | ".join(f.header) + " |", "|" + "---|" * len(f.header)]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in f.rows]
        lines += [f"\n![{s.name}]({p})" for p in f.plots]
    return "\n".join(lines) + "\n"


def _table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(done, host: dict, budget_s: float, out: Path, context: dict | None = None) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>frugallm report</title><style>"
             "body{font:15px/1.5 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;"
             "text-align:left;vertical-align:top}img{max-width:100%}.v{font-weight:600}</style>",
             "<h1>frugallm report: DeepSeek's claims, measured here</h1>",
             f"<p>{html.escape(context_line(host, budget_s, context or {}))}</p>",
             _table(["claim", "paper", "measured here", "verdict"], summary_rows(done))]
    for s, f in done:
        parts += [f"<h2 id='{s.name}'>{html.escape(s.title)}</h2>",
                  f"<p><b>Paper:</b> {html.escape(s.claim)}</p><p><b>Measured here:</b> {html.escape(f.measured)}</p>",
                  f"<p class='v'>Verdict: {html.escape(f.verdict)}.</p><p>{html.escape(f.why)}</p>",
                  f"<p><b>Set-up:</b> {html.escape(f.setup)} {html.escape(f.scale)}</p>",
                  f"<p><b>Reproduce alone:</b> <code>{html.escape(s.command)}</code></p>"]
        if f.rows:
            parts.append(_table(f.header, f.rows))
        for p in f.plots:
            data = base64.b64encode((out / p).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(s.name)}' src='data:image/png;base64,{data}'>")
    return "\n".join(parts) + "\n"


def write_report(done, out: Path, host: dict, budget_s: float, context: dict | None = None) -> None:
    from ..io import write_file

    write_file(out / "report.md", markdown(done, host, budget_s, context))
    write_file(out / "report.html", to_html(done, host, budget_s, out, context))
