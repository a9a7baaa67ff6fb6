"""Bad input fails early with one line that names the problem and the fix, exit code 2, no traceback;
`--debug` shows the traceback. Plus the training-loop rules that bad input used to break: eval_every
is honoured whatever log_every is, and a resume that asks for changes is refused, listing them."""

import hashlib
import json
import sys

import pytest
from conftest import word_corpus

from frugallm.cli import main

TINY = ["dim=32", "n_layers=2", "n_dense_layers=1", "n_heads=2", "q_lora_rank=0", "kv_lora_rank=16",
        "qk_nope_head_dim=8", "qk_rope_head_dim=8", "v_head_dim=8", "n_routed_experts=4", "n_expert_groups=1",
        "n_limited_groups=1", "n_activated_experts=2", "moe_inter_dim=16", "inter_dim=64", "vocab_size=300",
        "max_seq_len=64", "seq_len=32", "batch_size=4", "tokenizer_train_chars=50000", "warmup_steps=1",
        "eval_batches=1", "sample_tokens=0", "precision=fp32", "n_mtp=0"]


def sets(pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


def tree_hash(path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """4 steps, logging every 4, evaluating every 2."""
    root = tmp_path_factory.mktemp("errors")
    corpus = word_corpus(root / "corpus", "the cat sat on a mat and the dog ran to the park", docs=6,
                         words_per_doc=1500)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRUGALLM_CACHE", str(root / "cache"))
        args = ["train", "--out", str(root / "run"), "--data", str(corpus), "--steps", "4", "--no-sample",
                *sets(TINY + ["log_every=4", "eval_every=2", "save_every=4"])]
        assert main(args) == 0
        yield root / "run", corpus, mp


def fails(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("pair, message", [
    ("lr=abc", "lr='abc' must be a number"),
    ("save_every=0", "save_every=0 must be > 0"),
    ("eval_every=0", "eval_every=0 must be > 0"),
    ("steps=1.5", "steps=1.5 must be an integer"),
    ("no_such_key=1", "unknown config key 'no_such_key'"),
])
def test_a_bad_set_is_refused_before_any_work(tmp_path, capsys, pair, message):
    fails(capsys, ["train", "--out", str(tmp_path / "run"), "--set", pair], message)
    assert not (tmp_path / "run").exists()


def test_a_malformed_config_file_is_named(tmp_path, capsys):
    bad = tmp_path / "model.json"
    bad.write_text('{"dim": 64,')
    fails(capsys, ["train", "--out", str(tmp_path / "run"), "--config", str(bad)], f"{bad} is not valid JSON")
    bad.write_text('{"dim": "wide"}')
    fails(capsys, ["train", "--out", str(tmp_path / "run"), "--config", str(bad)], str(bad), "dim='wide' must be")
    bad.write_text("[1, 2]")
    fails(capsys, ["info", "--config", str(bad)], str(bad), "must hold a JSON object")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="must be a number"):
        main(["--debug", "train", "--out", str(tmp_path / "run"), "--set", "lr=abc"])


def test_eval_batches_must_be_positive(small_run, capsys):
    run, _, _ = small_run
    with pytest.raises(SystemExit) as e:
        main(["eval", str(run), "--batches", "0"])
    assert e.value.code == 2 and "--batches: 0 must be > 0" in capsys.readouterr().err


def test_serve_without_the_serve_extra_says_how_to_install_it(small_run, capsys, monkeypatch):
    run, _, _ = small_run
    for name in ("fastapi", "uvicorn"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError, as when not installed
    monkeypatch.delitem(sys.modules, "frugallm.infer.server", raising=False)
    fails(capsys, ["serve", str(run)], "pip install 'frugallm[serve]'")


def test_eval_every_is_honoured_between_log_lines(small_run):
    run, _, _ = small_run
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "val_loss" in m] == [2, 4]


def test_a_resume_that_asks_for_changes_is_refused_and_the_run_is_intact(small_run, capsys, tmp_path):
    run, corpus, _ = small_run
    before = tree_hash(run)
    resume = ["train", "--out", str(run), "--resume", "--no-sample"]
    fails(capsys, [*resume, "--set", "lr=0.01"], "lr: run has 0.003, asked 0.01", "start a new run with another --out")
    fails(capsys, [*resume, "--data", str(tmp_path)], f"data: run has '{corpus}'")
    fails(capsys, [*resume, "--preset", "small"], "dim: run has 32, asked 512")
    assert tree_hash(run) == before
    # what a resume may change (its length) is applied, and nothing else is taken as a change
    assert main([*resume, "--steps", "6"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 6 and "val_loss" in lines[-1]


def test_train_refuses_an_out_that_holds_other_files(tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"mine": true}')
    (project / "notes.txt").write_text("precious")
    fails(capsys, ["train", "--out", str(project), *sets(TINY)], "not a frugallm run (notes.txt)",
          "choose a new or empty --out")
    assert (project / "config.json").read_text() == '{"mine": true}'
