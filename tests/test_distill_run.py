"""`frugallm distill` end to end: a tiny student learns from the session's tiny teacher run.

The run is an ordinary frugallm run (load, resume); metrics carry the CE and KD parts and the top-1
agreement; an offline teacher with k = V trains exactly as the online one; gradient accumulation
gives the step of one big batch; on-policy micro-batches are sampled by the student."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import frugallm
from frugallm.cli import main

STUDENT = ["dim=32", "n_layers=2", "n_dense_layers=1", "n_heads=2", "q_lora_rank=0", "kv_lora_rank=16",
           "qk_nope_head_dim=8", "qk_rope_head_dim=8", "v_head_dim=8", "n_routed_experts=4", "n_expert_groups=1",
           "n_limited_groups=1", "n_activated_experts=2", "moe_inter_dim=16", "inter_dim=48", "max_seq_len=64",
           "seq_len=32", "warmup_steps=1", "eval_every=2", "eval_batches=1", "log_every=1", "sample_tokens=0",
           "precision=fp32", "n_mtp=0"]


def sets(pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


def distill(tiny_run, out, *flags, pairs=()):
    corpus = tiny_run.parent / "corpus"
    argv = ["distill", "--teacher", str(tiny_run), "--data", str(corpus), "--out", str(out), "--no-sample",
            *flags, *sets([*STUDENT, *pairs])]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _cache(tiny_run, monkeypatch):
    monkeypatch.setenv("FRUGALLM_CACHE", str(tiny_run.parent / "cache"))  # the teacher's data cache: no re-tokenizing


def test_a_distilled_run_is_an_ordinary_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "student"
    lines = distill(tiny_run, out, "--steps", "3", "--loss", "jsd", "--beta", "0.3", "--temperature", "2",
                    pairs=["batch_size=4"])
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(m["kd"] > 0 and 0 <= m["agreement"] <= 1 and m["ce"] > 0 for m in lines)
    # the progress line shows the parts, not only the blended loss that no `train` run can be compared with
    m = lines[-1]
    assert (f"step 3/3 | loss {m['loss']:.3f} (ce {m['ce']:.3f}, kd {m['kd']:.3f}, "
            f"teacher agreement {m['agreement']:.0%})") in capsys.readouterr().out
    assert "val_loss" in lines[1] and "val_loss" in lines[2]
    cfg = json.loads((out / "train_config.json").read_text())
    assert (cfg["teacher"], cfg["kd_loss"], cfg["kd_beta"], cfg["kd_temperature"]) == (str(tiny_run), "jsd", 0.3, 2.0)
    student = frugallm.load(out)  # loads, generates, resumes like any run
    assert student.config.vocab_size == frugallm.load_tokenizer(tiny_run).vocab_size
    assert main(["distill", "--teacher", str(tiny_run), "--out", str(out), "--resume", "--steps", "4",
                 "--no-sample"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_offline_top_k_of_the_whole_vocabulary_trains_as_the_online_teacher(tiny_run, tmp_path):
    vocab = frugallm.load_tokenizer(tiny_run).vocab_size
    online = distill(tiny_run, tmp_path / "online", "--steps", "2", pairs=["batch_size=2"])
    offline = distill(tiny_run, tmp_path / "offline", "--steps", "2", "--topk", str(vocab), pairs=["batch_size=2"])
    for a, b in zip(online, offline):  # the cache stores log-probs in fp16: equal to ~1e-3
        assert a["kd"] == pytest.approx(b["kd"], rel=2e-3, abs=1e-4) and a["ce"] == pytest.approx(b["ce"], rel=1e-4)


def test_gradient_accumulation_gives_the_step_of_one_big_batch(tiny_run, tmp_path):
    one = distill(tiny_run, tmp_path / "one", "--steps", "1", pairs=["batch_size=4", "grad_accum=1"])
    two = distill(tiny_run, tmp_path / "two", "--steps", "1", pairs=["batch_size=2", "grad_accum=2"])
    for key in ("loss", "ce", "kd"):
        assert one[0][key] == pytest.approx(two[0][key], rel=1e-5)
    a, b = frugallm.load(tmp_path / "one").state_dict(), frugallm.load(tmp_path / "two").state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_on_policy_micro_batches_are_sampled_by_the_student(tiny_run, tmp_path):
    lines = distill(tiny_run, tmp_path / "gkd", "--steps", "2", "--on-policy", "1", "--loss", "rkl",
                    pairs=["batch_size=2"])
    assert all(m["kd"] > 0 and torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    # on-policy batches train on the divergence alone: the reported loss is w=1's, kd (tau = 1)
    assert lines[0]["loss"] == pytest.approx(lines[0]["kd"], rel=1e-2)  # + the tiny balance loss


def test_distill_needs_a_teacher_and_refuses_bad_settings(tiny_run, tmp_path, capsys):
    assert main(["distill", "--out", str(tmp_path / "x")]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(tiny_run), "--out", str(tmp_path / "x"), "--kd-weight", "2"]) == 2
    assert "kd_weight" in capsys.readouterr().err


def test_the_r1_recipe_samples_the_teacher_then_trains_on_completions_only(tiny_run, tmp_path, capsys):
    """Sequence-level KD: `distill generate` writes prompt/completion records, `train --data` puts the
    loss on the completions (the data cache keeps a mask), and the run trains and evaluates."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["the cat", "a dog ran", "the park", "on a mat"] * 3))
    samples = tmp_path / "samples.jsonl"
    assert main(["distill", "generate", "--teacher", str(tiny_run), "--prompts", str(prompts), "--samples", "2",
                 "--out", str(samples), "--max-new-tokens", "24", "--batch-size", "4"]) == 0
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 24 and all(set(r) >= {"prompt", "completion"} for r in records)
    said = capsys.readouterr().out  # a line for a person, not the stats dict
    assert said.startswith(f"wrote 24 of 24 samples (12 prompts x 2) to {samples}") and "tokens/s" in said
    assert "frugallm teacher" in said and "seconds" not in said and "{" not in said
    assert main(["distill", "generate", "--teacher", str(tiny_run), "--prompts", str(prompts), "--samples", "2",
                 "--out", str(samples), "--max-new-tokens", "24", "--batch-size", "4"]) == 0
    assert capsys.readouterr().out == f"{samples} already holds all 24 samples (12 prompts x 2): nothing to do\n"
    out = tmp_path / "sft"
    argv = ["train", "--data", str(samples), "--out", str(out), "--steps", "2", "--no-sample",
            "--set", f"tokenizer={tiny_run}", *sets([*STUDENT, "batch_size=2", "seq_len=16", "val_fraction=0.2",
                                                        "vocab_size=300"])]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and "val_loss" in lines[-1]


def _distill_cmd(tiny_run, out, steps):
    return [sys.executable, "-m", "frugallm.cli", "distill", "--teacher", str(tiny_run), "--data",
            str(tiny_run.parent / "corpus"), "--out", str(out), "--steps", str(steps), "--save-every", "3",
            "--no-sample", "--on-policy", "0.5", "--loss", "jsd", *sets([*STUDENT, "batch_size=2", "grad_accum=2"])]


def test_a_distill_run_resumes_exactly_after_sigkill(tiny_run, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_distill_cmd(tiny_run, full, 9), check=True, capture_output=True)
    proc = subprocess.Popen(_distill_cmd(tiny_run, cut, 9), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "step_0000003").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    subprocess.run([*_distill_cmd(tiny_run, cut, 9), "--resume"], check=True, capture_output=True)
    metrics = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "ce", "kd", "agreement")
    assert [[m[k] for k in keys] for m in metrics(cut)] == [[m[k] for k in keys] for m in metrics(full)]


def test_the_teacher_is_untouched_and_the_offline_cache_is_keyed(tiny_run, tmp_path):
    from frugallm.distill.offline import build_topk_cache
    from frugallm.distill.teacher import Teacher
    from frugallm.train import data

    before = {p: p.read_bytes() for p in sorted(tiny_run.rglob("*")) if p.is_file()}
    tok = frugallm.load_tokenizer(tiny_run)
    teacher = Teacher.load(tiny_run, tok)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    weights = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    distill(tiny_run, tmp_path / "student", "--steps", "2", pairs=["batch_size=2"])
    assert {p: p.read_bytes() for p in sorted(tiny_run.rglob("*")) if p.is_file()} == before
    assert all(p.grad is None for p in teacher.model.parameters())
    tokens = data.prepare(str(tiny_run.parent / "corpus"), tok, 0.01).train[:32 * 8 + 1]
    build = lambda **kw: build_topk_cache(teacher, tokens, root=tmp_path / "topk", data_fingerprint="d", seq_len=32,
                                          progress=False, **{"k": 4, "temperature": 1.0, **kw})
    first = build()
    assert build().directory == first.directory  # the same key: opened, not rebuilt
    assert len({build(k=8).directory, build(temperature=2.0).directory, first.directory}) == 3
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in weights.items())
