"""`frugallm report` at a tiny budget (issue 30): every section present with a verdict, every figure a number
or "not measured, because ...", an interrupted run resumed from the sections already measured, a second run
that only redraws, and `--only` through the CLI."""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch

from frugallm.cli import main
from frugallm.report import sections
from frugallm.report.core import VERDICTS, Finding, Section, cache_path, host_key, run_report


class Interrupted(Exception):
    pass


def _interrupt(share, out):
    raise Interrupted()


def _check_finding(name: str, f: Finding) -> None:
    assert f.verdict in VERDICTS, name
    assert f.why.strip() and f.measured.strip(), name
    assert f.figures, f"{name}: no figures"
    for key, value in f.figures.items():
        ok = (isinstance(value, (int, float)) and math.isfinite(value)) or value.startswith("not measured, because ")
        assert ok, f"{name}.{key} = {value!r}"


def test_report_resumes_caches_and_covers_every_section(tmp_path):
    out, budget = tmp_path / "report", 30.0
    every = sections()
    names = [s.name for s in every]
    assert len(set(names)) == len(names) and {"mla_cache", "moe_balance", "mtp_loss", "mtp_decode", "mhc",
                                              "fp8_training", "kd", "pipeline_bubble", "dsa_decode", "grpo"} <= set(names)
    instant = [s for s in every if s.weight == 0 and s.name != "grpo"]
    # a run killed after the instant sections: each finding was saved as it was made
    with pytest.raises(Interrupted):
        run_report([*instant, Section("boom", "boom", "boom", _interrupt, weight=1)], budget, out, log=lambda s: None)
    host = host_key()
    assert all(cache_path(out, s, host, budget).exists() for s in instant)

    lines = []
    t0 = time.monotonic()
    done = run_report(every, budget, out, log=lines.append)
    took = time.monotonic() - t0
    assert took < budget + 25, f"{took:.0f} s for a {budget:.0f} s budget"
    for s in instant:  # resumed: not measured again
        assert any(line.startswith(f"[") and f"{s.name}: cached" in line for line in lines), s.name
    assert [s.name for s, _ in done] == names
    for s, f in done:
        _check_finding(s.name, f)
        saved = json.loads(cache_path(out, s, host, budget).read_text())
        assert saved["verdict"] == f.verdict
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for s, f in done:
        assert f"## {s.title}" in md and f"frugallm report --only {s.name}" in md and f"id='{s.name}'" in html
        assert all((out / p).exists() for p in f.plots)
    assert len(re.findall(r"\| (reproduced|not reproduced|not measurable at this scale) \|", md)) == len(done)
    assert "data:image/png;base64," in html and "![moe_balance](plots/" in md

    # a second run only redraws
    lines.clear()
    t0 = time.monotonic()
    again = run_report(every, budget, out, log=lines.append)
    assert time.monotonic() - t0 < 10
    assert sum("cached" in line for line in lines) == len(every)
    assert [f.measured for _, f in again] == [f.measured for _, f in done]


def test_findings_refuse_unworded_figures_and_unknown_verdicts():
    with pytest.raises(ValueError, match="not measured, because"):
        Finding("x", "reproduced", "why", "setup", figures={"a": "n/a"})
    with pytest.raises(ValueError, match="verdict"):
        Finding("x", "maybe", "why", "setup")


def test_cli_only_runs_the_named_sections(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["report", "--budget", "20s", "--out", str(out), "--only", "mla_cache,fp8_blocks"]) == 0
    md = (out / "report.md").read_text()
    assert "## MLA's KV cache" in md and "## Fine-grained FP8 scaling" in md and "## MoE balance" not in md
    assert main(["report", "--out", str(out), "--only", "mla_cache,nope"]) == 2
    assert "--only nope: no such section; choose from mla_cache" in capsys.readouterr().err


def test_mtp_acceptance_is_not_fooled_by_a_repetition_loop(cfg):
    """A looping greedy output is flagged (its drafts are all accepted), and the drafts on validation text
    equal a by-hand loop: the MTP module over the prefix up to i, fed the main model's hidden states and the
    true next tokens, against the main head's greedy token one position later."""
    from frugallm.model.transformer import Transformer
    from frugallm.report.trained import distinct_share, drafts_on_text

    assert distinct_share([[1, 2, 3] * 16]) < 0.1  # period 3: 3 distinct 4-grams of 46
    assert distinct_share([list(range(48))]) == 1.0
    model = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 24))
    drafts, greedy = drafts_on_text(model, x)
    with torch.no_grad():
        out = model(x)
        mtp = model.mtp[0]
        for i in range(22):
            ids = x[:, 1:i + 2]  # the true t_1..t_{i+1}: depth 1's input embeddings at positions 0..i
            h, _ = mtp(out.hidden[:, :i + 1], model.embed(ids), **model.block_kwargs(ids, None, False))
            assert model.head(mtp.norm(h))[0, -1].argmax() == drafts[0, i]
            assert model(x[:, :i + 2]).logits[0, -1].argmax() == greedy[0, i]
