"""Training end to end: data shards, schedules, exact resume (SIGKILL, SIGINT), corrupt checkpoints,
bad input, non-finite losses, a disk-full save, the CLI smoke run, and balance on a skewed router."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from frugallm.cli import main
from frugallm.config import get_preset
from frugallm.train.config import TrainConfig, apply_overrides
from frugallm.formats import checkpoint
from frugallm.model.transformer import Transformer
from frugallm.train import data
from frugallm.train.optim import build_optimizer, lr_at

SMALL = ["dim=64", "n_layers=2", "n_heads=2", "q_lora_rank=0", "kv_lora_rank=32", "qk_nope_head_dim=16",
         "qk_rope_head_dim=8", "v_head_dim=16", "n_routed_experts=8", "n_expert_groups=2", "n_limited_groups=1",
         "n_activated_experts=2", "moe_inter_dim=32", "inter_dim=128", "vocab_size=384", "max_seq_len=64",
         "seq_len=32", "batch_size=4", "tokenizer_train_chars=200000", "warmup_steps=3", "eval_every=5",
         "eval_batches=2", "log_every=1", "sample_tokens=0"]


def _cli(out, corpus, *extra, steps=12):
    return [sys.executable, "-m", "frugallm.cli", "train", "--data", str(corpus), "--out", str(out),
            "--steps", str(steps), "--no-sample", *[f"--set={s}" for s in SMALL + ["precision=fp32"]], *extra]


def _losses(run):
    return {r["step"]: (r["loss"], r.get("val_loss"), r.get("indexer_loss"))
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _run_until(cmd, run, step, sig):
    """Start a run, wait for checkpoint `step`, then send `sig`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    target = run / "checkpoints" / f"step_{step:07d}"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0].decode()
    return proc.returncode, out


# DeepSeek-V3.2's two DSA stages (model/indexer_loss.py): a query latent and an indexer whose top-8 of 32 keys
# is a real selection; warm-up: dense attention, only the indexers trained; sparse: top-k, all trained
DSA = ["--set=q_lora_rank=16", "--set=index_topk=8", "--set=index_n_heads=2", "--set=index_head_dim=16"]


# DeepSeek-V4 (preset tiny-v4, cut to SMALL's size): hybrid attention whose 32-token sequences cross the 8-token
# window, close 8 CSA entries (more than the indexer's top-4) and 4 HCA entries; hash-routed and sqrtsoftplus
# MoE, the release's mHC, an MTP block of its own kind
V4 = ["--preset=tiny-v4", *[f"--set={s}" for s in (
    "n_layers=3", "n_dense_layers=0", "n_expert_groups=1", "n_limited_groups=1", "head_dim=16", "q_lora_rank=16",
    'layer_types=["sliding","csa","hca","csa"]', "sliding_window=8", "hca_rate=8", "o_groups=2", "o_lora_rank=16",
    "index_topk=4", "index_n_heads=2", "index_head_dim=16")]]


@pytest.mark.parametrize("sig, stage", [(signal.SIGKILL, None), (signal.SIGINT, None), (signal.SIGKILL, "warmup"),
                                        (signal.SIGKILL, "sparse"), (signal.SIGKILL, "v4")])
def test_resume_is_bit_identical(tmp_path, corpus, sig, stage):
    extra = ["--save-every", "3", *(V4 if stage == "v4" else DSA + [f"--dsa-stage={stage}"] if stage else [])]
    steps = 12 if stage else 24  # (CI time)
    full = tmp_path / "full"
    subprocess.run(_cli(full, corpus, *extra, steps=steps), check=True, capture_output=True)
    cut = tmp_path / "cut"
    rc, out = _run_until(_cli(cut, corpus, *extra, steps=steps), cut, 6, sig)
    if sig == signal.SIGINT:
        assert rc == 130 and "interrupted: saved" in out, out
    else:
        assert rc == -signal.SIGKILL
    assert checkpoint.latest(cut) is not None
    subprocess.run(_cli(cut, corpus, "--resume", *extra, steps=steps), check=True, capture_output=True)
    assert _losses(cut) == _losses(full)  # every logged step, bit for bit (fp32), the indexer's KL included
    if stage in ("warmup", "sparse"):
        assert all(r[2] > 0 for r in _losses(full).values())
    if stage == "v4":
        assert json.loads((cut / "config.json").read_text())["attention"] == "hybrid"


def test_corrupt_and_partial_checkpoints_fall_back(tmp_path, corpus):
    run = tmp_path / "run"
    subprocess.run(_cli(run, corpus, "--save-every", "4", "--set=keep_last=3", steps=12), check=True, capture_output=True)
    ckpts = checkpoint.checkpoints(run)
    assert [c.name for c in ckpts] == ["step_0000004", "step_0000008", "step_0000012"]
    with open(ckpts[-1] / "model.safetensors", "r+b") as f:  # flip bytes in the newest
        f.seek(200)
        f.write(b"\x00" * 64)
    (ckpts[-2] / "manifest.json").unlink()  # and make the one before it look half-written
    with pytest.warns(UserWarning, match="does not match its sha256"):
        assert checkpoint.latest(run) == ckpts[0]
    with pytest.raises(checkpoint.CorruptCheckpoint, match="no manifest.json"):
        checkpoint.verify(ckpts[-2])


def test_cli_smoke_30_steps_prints_sample_and_baseline(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    sets = [f"--set={s}" for s in SMALL if not s.startswith("sample_tokens")] + ["--set=sample_tokens=20"]
    assert main(["train", "--data", str(corpus), "--out", str(run), "--steps", "30", *sets]) == 0
    out = capsys.readouterr().out
    assert "vs unigram baseline" in out and "--- sample" in out
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    keys = {"step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
            "max_violation", "val_loss"}
    assert keys <= set(rows[-1])
    assert rows[-1]["val_loss"] < rows[0]["loss"]
    for name in ("config.json", "tokenizer.json", "train_config.json"):
        assert (run / name).exists()
    ckpt = checkpoint.latest(run)
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer.json", "rng.safetensors",
            "tokenizer.json", "config.json", "manifest.json"} <= {p.name for p in ckpt.iterdir()}
    assert main(["eval", str(run), "--batches", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["plot", str(run)]) == 0
    assert (run / "loss.png").stat().st_size > 1000
    # a second run into the same directory must not clobber it
    assert main(["train", "--data", str(corpus), "--out", str(run), "--steps", "2", *sets]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_data_manifest_and_cache(tmp_path, corpus):
    from frugallm.tokenizer import train_tokenizer

    tok = train_tokenizer(iter([(corpus / "doc0.txt").read_text()]), 300)
    (corpus / "bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")
    first = data.prepare(str(corpus), tok, val_fraction=0.2)
    m = first.manifest
    assert m["tokenizer_hash"] == tok.hash() and m["replaced_bytes"] == 3
    assert m["documents"]["train"] + m["documents"]["val"] == 13
    assert m["tokens"]["train"] == len(first.train) and m["tokens"]["val"] == len(first.val) > 0
    stamp = (first.directory / "train.bin").stat().st_mtime_ns
    again = data.prepare(str(corpus), tok, val_fraction=0.2)
    assert again.directory == first.directory and (again.directory / "train.bin").stat().st_mtime_ns == stamp
    (corpus / "doc1.txt").write_text("changed")  # a changed source is a new cache entry
    assert data.prepare(str(corpus), tok, val_fraction=0.2).directory != first.directory
    assert first.train[0] == tok.bos_id  # documents are packed as BOS ... EOS
    b = data.Batches(first.train, 16, 4, seed=1)
    x, y = b.get(7)
    assert torch.equal(x, b.get(7)[0]) and torch.equal(x[:, 1:], y[:, :-1])


def test_the_split_is_the_same_after_moving_the_corpus(tmp_path, corpus, monkeypatch):
    """Documents are assigned to train/val by their path relative to the corpus, not the absolute path."""
    import numpy as np

    from frugallm.tokenizer import train_tokenizer

    tok = train_tokenizer(iter([(corpus / "doc0.txt").read_text()]), 300)
    (corpus / "sub").mkdir()
    (corpus / "sub" / "deep.txt").write_text("import value for value in self")
    first = data.prepare(str(corpus), tok, val_fraction=0.3)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    corpus.rename(moved)
    monkeypatch.setenv("FRUGALLM_CACHE", str(tmp_path / "fresh-cache"))  # tokenized again, not read from cache
    again = data.prepare(str(moved), tok, val_fraction=0.3)
    assert again.directory != first.directory
    assert np.array_equal(first.train, again.train) and np.array_equal(first.val, again.val)
    assert first.manifest["documents"] == again.manifest["documents"]


def test_jsonl_fields(tmp_path, corpus):
    from frugallm.tokenizer import train_tokenizer

    tok = train_tokenizer(iter(["hello world " * 50]), 300)
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hello"}\n{"prompt": "Q: ", "completion": "A"}\n')
    docs = [t for _, t in data.iter_documents(str(path), "text")]
    assert docs == ["hello", "Q: A"]
    path.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="line 1 has neither 'text' nor prompt/completion"):
        data.prepare(str(path), tok)
    # a line that is JSON but not an object, or not JSON at all: the file and the line (issue 25)
    for line, message in (("5", "line 2 is 5, not a JSON object"), ('"hello"', "line 2 is 'hello', not a JSON object"),
                          ('{"text": "a",', "line 2 is not valid JSON")):
        path.write_text('{"text": "hello"}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"{path} {message}"):
            data.prepare(str(path), tok)


def test_bad_data_is_a_clear_error_and_keeps_checkpoints(tmp_path, corpus, capsys):
    sets = [f"--set={s}" for s in SMALL]
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r1"), *sets]) == 2
    assert "neither a file, a directory nor a glob" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "r2"), *sets]) == 2
    assert "holds no text" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r3"), "--set", "dims=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'dims'" in err and "n_routed_experts" in err and "grad_accum" in err


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, corpus, monkeypatch):
    from frugallm.train import trainer

    model_cfg, train_cfg = apply_overrides(get_preset("tiny"), TrainConfig(data=str(corpus)), SMALL + ["save_every=4"])
    run = tmp_path / "run"
    real_save, calls = checkpoint.save_file, {"n": 0}

    def flaky(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] > 3:  # the second checkpoint's writes fail (3 safetensors files per checkpoint)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", flaky)
    with pytest.raises(OSError, match="No space left"):
        trainer.train(model_cfg, train_cfg.__class__(**{**train_cfg.to_dict(), "steps": 12}), run, log=lambda s: None)
    assert [c.name for c in checkpoint.checkpoints(run)] == ["step_0000004"]
    checkpoint.verify(run / "checkpoints" / "step_0000004")
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_non_finite_loss_stops_or_skips(tmp_path, corpus, monkeypatch):
    from frugallm.train import trainer

    real_forward, calls = Transformer.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and calls["n"] == 7:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    model_cfg, train_cfg = apply_overrides(get_preset("tiny"), TrainConfig(data=str(corpus)),
                                           SMALL + ["save_every=2", "steps=10", "eval_every=100"])
    with pytest.raises(trainer.NonFiniteLoss, match="non-finite loss nan at step 7.*step_0000006"):
        trainer.train(model_cfg, train_cfg, tmp_path / "stop", log=lambda s: None)
    checkpoint.verify(checkpoint.latest(tmp_path / "stop"))
    calls["n"] = 0
    logs = []
    skip = train_cfg.__class__(**{**train_cfg.to_dict(), "skip_nonfinite": True})
    result = trainer.train(model_cfg, skip, tmp_path / "skip", log=logs.append)
    assert result.step == 10 and any("step skipped" in line for line in logs)


def test_lr_schedules():
    cos = [lr_at(s, 100, 1.0, 10, 0.1, "cosine", 0.2) for s in range(100)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[9:], cos[10:]))
    wsd = [lr_at(s, 100, 1.0, 10, 0.1, "wsd", 0.2) for s in range(100)]
    assert set(wsd[9:80]) == {1.0} and wsd[-1] == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    from frugallm import Transformer
    from conftest import tiny_config

    model = Transformer(tiny_config())
    decay, no_decay = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.layers[1].ffn.experts.w1 for p in decay["params"])
    assert any(p is model.norm.weight for p in no_decay["params"])
    mhc = Transformer(tiny_config(residual="mhc"))
    decay, no_decay = build_optimizer(mhc, 1e-3, 0.1, (0.9, 0.95), 1e-8).param_groups
    b_res = mhc.layers[0].attn_conn.b_res
    assert b_res.dim() == 2 and any(p is b_res for p in no_decay["params"])
    assert not any(p is b_res for p in decay["params"])


def test_bias_update_balances_a_skewed_router():
    from frugallm.model.moe import MoE, update_expert_bias
    from conftest import tiny_config

    cfg = tiny_config(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
        torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        moe.gate.weight[:2] += 0.05  # inputs share a mean direction that favours experts 0 and 1
    vios = []
    for _ in range(300):  # a fresh batch of the same skewed distribution every step
        with torch.no_grad():
            moe(torch.randn(8, 128, cfg.dim) + 0.3)
        vios.append(update_expert_bias(moe, gamma=0.01)[0])
    assert vios[0] > 1.0  # experts 0 and 1 take more than twice their share
    assert sum(vios[-20:]) / 20 < 0.2 and max(vios[-20:]) < 0.35, vios[-20:]
    assert moe.gate.bias[:2].max() < moe.gate.bias[2:].min()  # the favoured experts were pushed down
