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
    # ranges (issue 25): each of these used to be accepted and silently did harm
    ("grad_clip=-1", "grad_clip=-1.0 must be > 0"),
    ("grad_clip=0", "grad_clip=0.0 must be > 0"),
    ("min_lr_ratio=-1", "min_lr_ratio=-1.0 must be in [0, 1]"),
    ("warmup_steps=-3", "warmup_steps=-3 must be >= 0"),
    ("lr=NaN", "lr=nan must be > 0"),
    ("weight_decay=-0.1", "weight_decay=-0.1 must be >= 0"),
    ("beta2=1", "beta2=1.0 must be in [0, 1)"),
    ("adam_eps=0", "adam_eps=0.0 must be > 0"),
    ("bias_gamma=-1", "bias_gamma=-1.0 must be >= 0"),
    ("val_fraction=NaN", "val_fraction=nan must be in (0, 1)"),
    ("tokenizer_train_chars=0", "tokenizer_train_chars=0 must be > 0"),
    ("sample_tokens=-1", "sample_tokens=-1 must be >= 0"),
    ("kd_temperature=NaN", "kd_temperature=nan must be > 0"),
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


# --- issue 25: a run's directory is its own: its tokenizer, its metrics, one writer ---------------------

def _copy_run(small_run, tmp_path):
    import shutil

    run, _, _ = small_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_tokenizer_train_refuses_a_run_and_writes_its_own_directory(small_run, capsys, tmp_path):
    run, corpus, _ = small_run
    before = tree_hash(run)
    train_tok = ["tokenizer", "train", str(corpus), "--vocab", "280", "--out"]
    fails(capsys, [*train_tok, str(run)], "it is a training run", "--out")
    assert tree_hash(run) == before  # the run's tokenizer is its own
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    fails(capsys, [*train_tok, str(notes)], "1 entries that frugallm did not write")
    out = tmp_path / "tok"
    assert main([*train_tok, str(out)]) == 0
    assert main([*train_tok, str(out)]) == 0  # its own earlier output: replaced whole
    from frugallm.tokenizer import load_tokenizer

    assert load_tokenizer(out).vocab_size == 280


def test_a_resume_with_another_tokenizer_is_refused(small_run, capsys, tmp_path):
    from frugallm.formats import checkpoint
    from frugallm.tokenizer import train_tokenizer

    run = _copy_run(small_run, tmp_path)
    ckpt = checkpoint.latest(run)
    other = train_tokenizer(iter(["a b c d e f g " * 300]), 270)
    (run / "tokenizer.json").write_text(other.to_str())  # replaced behind frugallm's back
    before = tree_hash(run)
    fails(capsys, ["train", "--out", str(run), "--resume", "--steps", "5", "--no-sample"],
          f"{run / 'tokenizer.json'} differs from", str(ckpt / "tokenizer.json"))
    assert tree_hash(run) == before


def test_train_refuses_a_foreign_directory_and_the_working_directory(small_run, tmp_path, capsys, monkeypatch):
    _, corpus, _ = small_run
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "config.json").write_text('{"mine": true}')
    (project / "metrics.jsonl").write_text('{"step": 1, "accuracy": 0.9}\n')
    before = tree_hash(project)
    argv = ["train", "--data", str(corpus), "--steps", "1", "--no-sample", *sets(TINY), "--out"]
    fails(capsys, [*argv, str(project)], "not a frugallm run (.git)")
    (project / ".git" / "HEAD").unlink()
    (project / ".git").rmdir()
    before.pop(".git/HEAD")
    fails(capsys, [*argv, str(project)], "no train_config.json", "choose a new or empty --out")
    assert tree_hash(project) == before
    monkeypatch.chdir(project)
    fails(capsys, [*argv, "."], "it is the working directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    fails(capsys, [*argv, "."], "it is the working directory")
    assert tree_hash(project) == before and not any(empty.iterdir())


def test_a_torn_metrics_line_is_dropped_and_another_bad_line_is_named(small_run, capsys, tmp_path):
    run = _copy_run(small_run, tmp_path)
    metrics = run / "metrics.jsonl"
    good = metrics.read_text()
    steps = [json.loads(line)["step"] for line in good.splitlines()]  # (other tests may have resumed the run)
    torn = len(steps) + 1
    metrics.write_text(good + f'{{"step": {steps[-1] + 1}, "loss": 4.')  # what a crash mid-write leaves
    assert main(["plot", str(run)]) == 0
    assert f"{metrics} line {torn} is cut short" in capsys.readouterr().err
    resume = ["train", "--out", str(run), "--resume", "--steps", str(steps[-1] + 1), "--no-sample"]
    assert main(resume) == 0
    assert f"{metrics} line {torn} is cut short" in capsys.readouterr().out  # the resume's warning, in its log
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [*steps, steps[-1] + 1]
    metrics.write_text('{"step": 1,\n' + good)  # not a crash: someone's edit
    fails(capsys, ["plot", str(run)], f"{metrics} line 1 is not valid JSON")
    before = tree_hash(run)
    fails(capsys, [*resume[:-2], str(steps[-1] + 2), "--no-sample"], f"{metrics} line 1 is not valid JSON")
    assert tree_hash(run) == before
    metrics.write_text(good + "[1, 2]\n" + good)
    fails(capsys, ["plot", str(run)], f"{metrics} line {torn} is not a metrics record")


LOCK_HOLDER = """
import sys, time
from frugallm import io
lock = io.lock_directory(sys.argv[1])  # what a trainer holds while it runs
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_trainer_on_the_same_out_is_refused_until_the_first_is_gone(small_run, capsys, tmp_path):
    import signal
    import subprocess

    run = _copy_run(small_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_hash(run)
        fails(capsys, ["train", "--out", str(run), "--resume", "--steps", "5", "--no-sample"],
              f"{run} is being written by another frugallm process (pid {holder.pid}")
        assert tree_hash(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the OS releases its lock
        holder.wait()
    assert main(["train", "--out", str(run), "--resume", "--steps", "5", "--no-sample"]) == 0
