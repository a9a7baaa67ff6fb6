import json

import pytest
import torch

from frugallm.cli import main


def test_info_builds_and_runs_tiny(capsys):
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "forward pass: input (1, 16) -> logits (1, 16, 4096), finite=True" in out
    assert "total" in out and "active" in out and "mtp" in out


def test_info_counts_v3_without_building(capsys):
    assert main(["info", "--preset", "v3"]) == 0
    out = capsys.readouterr().out
    assert "671,026,419,200" in out and "not built" in out


def test_info_reports_kv_cache_bytes_per_token_and_the_indexer_keys(capsys):
    from frugallm import get_preset
    from frugallm.infer.memory import bytes_per_token
    from frugallm.model.kv_cache import KVCache

    assert main(["info", "--preset", "v32"]) == 0  # V3.2: 61 layers of 512 + 64 + 128 values, not built
    out = capsys.readouterr().out
    assert "KV cache per token: 704 values a layer (latent 512 + rope key 64 + indexer key 128: 18.2% DSA " in out
    assert "all 61 layers  171,776 B fp32 (indexer keys 31,232 B), 85,888 B bf16 (indexer keys 15,616 B)" in out
    assert main(["info", "--preset", "v3"]) == 0
    out = capsys.readouterr().out
    assert "KV cache per token: 576 values a layer (latent 512 + rope key 64)\n" in out and "indexer" not in out
    assert main(["info", "--preset", "tiny-v32"]) == 0  # built: what it prints is what a KVCache allocates
    cfg = get_preset("tiny-v32")
    fp32 = KVCache(cfg, 1, 2).bytes_per_token()
    assert f"all 4 layers   {fp32:,} B fp32 (indexer keys {4 * 32 * 4:,} B)" in capsys.readouterr().out
    assert bytes_per_token(cfg, torch.float32) == fp32 + 8  # the server's budget counts the indexer keys too


def test_info_reads_a_config_file(tmp_path, capsys):
    from frugallm import get_preset

    get_preset("tiny", n_layers=2).to_json(tmp_path / "c.json")
    assert main(["info", "--config", str(tmp_path / "c.json")]) == 0
    assert "layers.1.ffn" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["info", "--preset", "huge"]) == 2
    from frugallm.config import PRESETS

    assert f"unknown preset 'huge'; choose one of: {', '.join(PRESETS)}" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"dims": 3}))
    assert main(["info", "--config", str(tmp_path / "bad.json")]) == 2
    assert "unknown ModelConfig key(s) ['dims']" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["this-host", "no-bf16", "bf16"])
def test_generate_and_quantize_commands(tiny_run, tmp_path, capsys, monkeypatch, host):
    if host != "this-host":  # the auto choice and the quantized paths as on a host of the other kind
        monkeypatch.setenv("FRUGALLM_HOST", host)
    assert main(["generate", str(tiny_run), "--prompt", "the cat", "--max-new-tokens", "12", "--speculative"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the cat") and "tokens/s" in captured.err and "acceptance" in captured.err
    if host != "this-host":
        assert f"inference dtype auto -> {'fp32' if host == 'no-bf16' else 'bf16'}" in captured.err
    if host == "no-bf16":  # fp32: plain weights (MKL reads them as they are), nothing prepacked
        assert "matmul kernels: 23 plain PyTorch, 2 grouped experts" in captured.err and "prepacked" not in captured.err
        assert "(of the 25 matmul modules: linear layers and expert groups)" in captured.err
    for fmt in ("int8", "fp8"):
        assert main(["quantize", str(tiny_run), "--to", fmt, "--out", str(tmp_path / fmt)]) == 0
        assert "bytes/param" in capsys.readouterr().out
        assert main(["generate", str(tmp_path / fmt), "--prompt", "the", "--max-new-tokens", "5"]) == 0
    assert main(["quantize", str(tiny_run), "--to", "int8", "--layout", "deepseek", "--out", str(tmp_path / "x")]) == 2
    assert "FP8 only" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2


def test_generate_compiled(tiny_run, capsys):
    from frugallm import load
    from frugallm.kernels.compiled import unavailable_reason

    reason = unavailable_reason(load(tiny_run))
    if reason:
        pytest.skip(reason)
    assert main(["generate", str(tiny_run), "--prompt", "the cat", "--max-new-tokens", "8", "--compile"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the cat") and "compiling the decode step" in captured.err
    assert "decode" in captured.err and "tokens/s" in captured.err


def test_info_plan_follows_the_host(tiny_run, tmp_path, capsys, monkeypatch):
    from frugallm.host import host_profile

    plans = {}
    for host in ("no-bf16", "bf16"):  # the plan of a host of each kind, on any machine (host.py FRUGALLM_HOST)
        monkeypatch.setenv("FRUGALLM_HOST", host)
        assert main(["info", "--plan"]) == 0
        plans[host] = capsys.readouterr().out
        assert main(["info", "--plan", "--purpose", "train"]) == 0
        plans[host, "train"] = capsys.readouterr().out
    no_bf16, bf16 = plans["no-bf16"], plans["bf16"]
    assert no_bf16.startswith("inference: float32 + cast\n") and "inference dtype auto -> fp32" in no_bf16
    assert "prepack" not in no_bf16  # fp32 weights: nothing to pack
    assert bf16.startswith("inference: bfloat16 + cast") and "inference dtype auto -> bf16" in bf16
    if host_profile().bf16_prepack:  # the forced bf16 host packs where this machine's oneDNN does
        assert bf16.startswith("inference: bfloat16 + cast + prepack\n") and "prepack: bf16 weights packed" in bf16
    else:
        assert "no prepack: this host's oneDNN does not pack bf16 weights" in bf16
    assert plans["no-bf16", "train"].startswith("train: float32\n")
    assert plans["bf16", "train"].startswith("train: bfloat16 + autocast\n") and "fp32 master weights" in plans[
        "bf16", "train"]
    # the flags: no prepacking, a compiled decode (which packs its own weights), fp8 only for training
    assert main(["info", "--plan", "--no-prepack"]) == 0
    assert capsys.readouterr().out.startswith("inference: bfloat16 + cast\n")
    assert main(["info", "--plan", "--compile"]) == 0
    assert capsys.readouterr().out.startswith("inference: bfloat16 + cast + compile\n")
    assert main(["info", "--plan", "--fp8"]) == 2 and "fp8 is a training plan" in capsys.readouterr().err
    # a RUN: plain weights plan as above; a quantized export keeps its codes, and its int8 codes compile
    assert main(["info", "--plan", str(tiny_run)]) == 0 and "quantized" not in capsys.readouterr().out
    assert main(["quantize", str(tiny_run), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["info", "--plan", str(tmp_path / "q")]) == 0
    assert "quantized weights kept as codes" in capsys.readouterr().out
    assert main(["info", "--plan", str(tmp_path / "q"), "--compile"]) == 0
    assert "GEMVs read them" in capsys.readouterr().out  # kernels/compiled_quant.py


def test_parameter_counts_use_the_same_words_everywhere(tiny_run, tmp_path, capsys, monkeypatch):
    """Issue 31: train and info said 8,223,792 parameters ("total"), quantize 10,158,592: the main model
    vs everything it holds, MTP included. Each now names the main model, MTP and the total."""
    from frugallm import load
    from frugallm.kernels.quantize import weight_bytes
    from frugallm.model.count import count_params, in_words

    assert main(["info", "--preset", "tiny"]) == 0
    rows = {line[:33].strip(): line[33:].split()[0] for line in capsys.readouterr().out.splitlines()[1:7]}
    assert rows == {"main model": "8,223,792", "main model, active per token": "4,684,848",
                    "embedding + output head": "2,097,152", "MTP": "1,934,800", "MTP, active per token": "755,152",
                    "total (main model + MTP)": "10,158,592"}
    words = in_words(count_params(load(tiny_run).config))
    assert words.endswith(" in MTP = 51,832 total") and "parameters in the main model" in words
    assert main(["quantize", str(tiny_run), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    assert words in capsys.readouterr().out and weight_bytes(load(tmp_path / "q"))["params"] == 51_832
    monkeypatch.setenv("FRUGALLM_CACHE", str(tiny_run.parent / "cache"))
    pairs = json.loads((tiny_run / "config.json").read_text())
    sets = [f"{k}={v}" for k, v in pairs.items() if k in ("dim", "n_layers", "n_dense_layers", "n_heads",
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
            "n_expert_groups", "n_limited_groups", "n_activated_experts", "moe_inter_dim", "inter_dim", "vocab_size")]
    sets += ["seq_len=16", "batch_size=2", "eval_batches=1", "sample_tokens=0", "precision=fp32",
             f"tokenizer={tiny_run}"]
    assert main(["train", "--data", str(tiny_run.parent / "corpus"), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--no-sample", *[a for s in sets for a in ("--set", s)]]) == 0
    assert f"model: {words} | 1 steps" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve"]])
def test_compiling_a_quantized_checkpoint_says_what_to_type(tiny_run, tmp_path, capsys, command):
    """Issue 31: `serve RUN --compile` on a quantized checkpoint told a CLI user to call
    frugallm.load_for_inference(path, prepack=False). int8 / int4 codes compile now (kernels/compiled_quant.py);
    fp8 codes do not, and are refused before any weight is read, saying what to type."""
    if command[0] == "serve":
        pytest.importorskip("fastapi")
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_run), "--to", "fp8", "--out", str(q)]) == 0
    capsys.readouterr()
    assert main([command[0], str(q), *command[1:], "--compile"]) == 2
    err = capsys.readouterr().err
    assert "add --dtype bf16 (or fp32)" in err and "load_for_inference" not in err
