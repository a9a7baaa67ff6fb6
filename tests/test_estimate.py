"""`frugallm estimate`: V3's published budget from FLOPs per token, and the CLI around it."""

import json

import pytest

from frugallm.cli import main
from frugallm.config import get_preset
from frugallm.model.flops import attended_keys, train_flops_per_token
from frugallm.train.estimate import ACCELERATORS, DEFAULT_MFU, PUBLISHED, parse_tokens, run_estimate


def _v3():
    return run_estimate(get_preset("v3"), "v3", tokens=None, seq_len=None, gpu="h800", gpus=2048, mfu=None,
                        price=None, published=PUBLISHED["v3"])


def test_v3_budget_is_reproduced_within_5_percent():
    e = _v3()
    assert abs(e["gpu_hours"] / 2_788_000 - 1) < 0.05  # V3 Table 1: 2.788M H800 GPU-hours in all
    assert abs(e["cost"] / 5.576e6 - 1) < 0.05  # $5.576M at $2 an hour
    pre = e["published"]["pre-training"]
    assert abs(pre["estimated"] / 2_664_000 - 1) < 0.05
    assert abs(pre["implied_mfu"] - DEFAULT_MFU) < 0.01  # the default is what V3's own figures imply
    # 180K GPU-hours per trillion tokens (V3 Table 1 note)
    per_trillion = 1e12 * train_flops_per_token(get_preset("v3"), 4096) / (DEFAULT_MFU * ACCELERATORS["h800"][1]) / 3600
    assert abs(per_trillion / 180_000 - 1) < 0.05


def test_flops_per_token_follow_six_n_plus_attention():
    v3 = get_preset("v3")
    fpt = train_flops_per_token(v3, 4096)
    assert 250e9 < fpt < 265e9  # 6 x 37.6B active (MTP included) + attention at 4K
    assert train_flops_per_token(v3, 8192) > fpt  # dense attention grows with the context
    v32 = get_preset("v32")  # DSA: past top-k the attention stops growing; only the indexer (1/5 the cost a key) does
    long = [train_flops_per_token(v32, s) for s in (65536, 131072)]
    dense = [train_flops_per_token(v3, s) for s in (65536, 131072)]
    assert long[1] - long[0] < 0.25 * (dense[1] - dense[0])
    assert train_flops_per_token(v32, 131072, dense=True) > 2 * long[1]  # the warm-up attends densely
    assert attended_keys(100) == 50 and attended_keys(100, 10) == pytest.approx(9.5)


@pytest.mark.parametrize("text, tokens", [("14.8T", 14.8e12), ("500B", 5e11), ("2m", 2e6), ("1e9", 1e9), ("4096", 4096)])
def test_token_counts_parse(text, tokens):
    assert parse_tokens(text) == tokens


def test_cli_json_and_refusals(capsys):
    assert main(["estimate", "--preset", "v2", "--tokens", "1T", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["rows"][0]["tokens"] == 1e12 and e["days"] > 0 and e["mfu"] == DEFAULT_MFU
    for flags, message in ((["--gpu", "tpu"], "--gpu 'tpu' is not known"), (["--mfu", "40"], "must be a fraction"),
                           (["--tokens", "lots"], "not a token count"),
                           (["--preset", "tiny", "--tokens", "1B", "--seq-len", "4096"], "exceeds the model's context"),
                           (["--preset", "tiny"], "give --tokens")):
        assert main(["estimate", *flags]) == 2
        assert message in capsys.readouterr().err


def test_cpu_estimate_measures_this_host(capsys):
    assert main(["estimate", "--preset", "tiny", "--tokens", "10M", "--gpu", "cpu", "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "this CPU" in out and "CPU-hours" in out and "train steps of 16 x 256 tokens" in out and "$" not in out
