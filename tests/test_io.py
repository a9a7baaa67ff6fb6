"""frugallm/io.py: no command destroys data it did not create; writes are whole or not at all; loads verify.

Also the data cache it writes: streamed to disk, equal to the in-memory tokenization."""

import codecs
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config

import frugallm
from frugallm import Transformer, io
from frugallm.formats import hf as convert
from frugallm.cli import main
from frugallm.train.config import TrainConfig
from frugallm.export import quantize_checkpoint
from frugallm.tokenizer import train_tokenizer
from frugallm.formats import checkpoint
from frugallm.train import data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training run as the trainer lays it out, with one checkpoint (no training: milliseconds)."""
    run = tmp_path_factory.mktemp("io") / "run"
    run.mkdir()
    model = Transformer(tiny_config())
    tok = train_tokenizer(iter(["the cat sat on the mat " * 40]), 300)
    model.config.to_json(run / "config.json")
    TrainConfig().to_json(run / "train_config.json")
    (run / "tokenizer.json").write_text(tok.to_str())
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 4.5}\n')
    checkpoint.save(run, 1, model, torch.optim.AdamW(model.parameters()), {"step": 1}, tok.to_str(),
                    model.config, TrainConfig(), keep_last=2)
    return run


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): io.sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _flip(file, at=100):
    with open(file, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


# --- refusing to write -----------------------------------------------------------------------------

def test_quantize_refuses_its_own_run_and_keeps_it_intact(run, tmp_path):
    before = _hashes(run)
    with pytest.raises(io.OutputError, match=rf"over {run}: it is {run}, the source being read; .*e\.g\. {run}-int8"):
        quantize_checkpoint(run, "int8", run)
    with pytest.raises(io.OutputError, match="it holds .*step_0000001, the source being read"):
        quantize_checkpoint(run / "checkpoints" / "step_0000001", "int8", run)
    other = tmp_path / "other-run"  # someone's training run, not the source
    shutil.copytree(run, other)
    with pytest.raises(io.OutputError, match="it is a training run, not a quantized export written by frugallm"):
        quantize_checkpoint(run, "int8", other)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(io.OutputError, match="1 entries that frugallm did not write"):
        quantize_checkpoint(run, "int8", notes)
    assert _hashes(run) == before and (notes / "todo.txt").read_text() == "keep me"


def test_quantize_refuses_the_working_and_home_directories(run, tmp_path, monkeypatch):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()  # empty, and refused all the same
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    (work / "thesis.tex").write_text("years of work")
    with pytest.raises(io.OutputError, match=r"over \.: it is the working directory"):
        quantize_checkpoint(run, "int8", ".")
    with pytest.raises(io.OutputError, match="it holds the working directory"):
        quantize_checkpoint(run, "int8", "..")
    with pytest.raises(io.OutputError, match="it is the home directory"):
        quantize_checkpoint(run, "int8", home)
    assert (work / "thesis.tex").read_text() == "years of work"


def test_cli_quantize_refuses_run_and_dot_without_a_traceback(run, tmp_path, monkeypatch, capsys):
    before = _hashes(run)
    assert main(["quantize", str(run), "--to", "int8", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "refusing to write the quantized export over" in err and "Traceback" not in err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    assert main(["quantize", str(run), "--to", "int8", "--out", "."]) == 2
    assert "it is the working directory" in capsys.readouterr().err
    assert _hashes(run) == before and (tmp_path / "keep.txt").exists()


def test_an_output_replaces_its_own_kind_only(run, tmp_path):
    out = quantize_checkpoint(run, "int8", tmp_path / "q")
    assert io.read_manifest(out)["kind"] == "quantized"
    quantize_checkpoint(run, "int8", out)  # an earlier quantized export: replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old copy left
    with pytest.raises(io.OutputError, match="it is a quantized export, not a Hugging Face export"):
        frugallm.to_hf(frugallm.load(run), out)
    with pytest.raises(io.OutputError, match="it is a file"):
        (tmp_path / "f").write_text("")
        quantize_checkpoint(run, "int8", tmp_path / "f")


# --- crashes -------------------------------------------------------------------------------------

def _write(path, text):
    with io.write_directory(path, "hf") as tmp:
        (tmp / "a.txt").write_text(text)


@pytest.mark.parametrize("fail_at", [1, 2])  # 1: between the write and the swap; 2: between the two renames
def test_a_failed_swap_keeps_the_old_copy(tmp_path, monkeypatch, fail_at):
    out = tmp_path / "out"
    _write(out, "old")
    real, renames = os.replace, []

    def replace(a, b):
        if os.path.isdir(a):  # directory renames only (the manifest's own file rename is not counted)
            renames.append(a)
            if len(renames) == fail_at:
                raise OSError("injected: disk full")
        real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        _write(out, "new")
    assert (out / "a.txt").read_text() == "old"
    io.verify(out, "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


CRASH = """
import importlib.util, os, sys, types
pkg = types.ModuleType("fpkg"); pkg.__path__ = [os.path.dirname(sys.argv[1])]; sys.modules["fpkg"] = pkg
spec = importlib.util.spec_from_file_location("fpkg.io", sys.argv[1])  # io.py and names.py alone: no torch import
fio = importlib.util.module_from_spec(spec); sys.modules["fpkg.io"] = fio; spec.loader.exec_module(fio)
real, renames = os.replace, []
def replace(a, b):
    if os.path.isdir(a):
        renames.append(a)
        if len(renames) == int(sys.argv[3]):
            os._exit(3)  # the process dies here: no except, no finally
    real(a, b)
os.replace = replace
with fio.write_directory(sys.argv[2], "hf") as tmp:
    (tmp / "a.txt").write_text("new")
"""


def test_a_crash_leaves_the_old_copy_whole_and_the_next_write_recovers(tmp_path):
    out = tmp_path / "out"
    _write(out, "old")
    crash = lambda n: subprocess.run([sys.executable, "-c", CRASH, io.__file__, str(out), str(n)]).returncode
    assert crash(1) == 3  # after the new copy is sealed, before the swap
    assert (out / "a.txt").read_text() == "old" and io.verify(out, "hf")
    assert crash(2) == 3  # the old copy renamed aside, the new one not yet in
    assert not out.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert len(aside) == 1 and (aside[0] / "a.txt").read_text() == "old" and io.verify(aside[0], "hf")
    with pytest.raises(io.CorruptOutput, match="previous copy is at .*out.old-.*rename it back"):
        io.verify(out)
    _write(out, "newer")  # puts the old copy back first, then replaces it as usual
    assert (out / "a.txt").read_text() == "newer" and not aside[0].exists()


# --- verifying on load ---------------------------------------------------------------------------

def test_loads_catch_a_corrupted_file(run, tmp_path, monkeypatch):
    ckpt = tmp_path / "step"
    shutil.copytree(run / "checkpoints" / "step_0000001", ckpt)
    _flip(ckpt / "model.safetensors")
    model = Transformer(tiny_config())
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"model.safetensors does not match its sha256.*delete"):
        checkpoint.load(ckpt, model, None)
    os.truncate(ckpt / "model.safetensors", 10)
    with pytest.raises(checkpoint.CorruptCheckpoint, match="is 10 bytes, its manifest.json says"):
        checkpoint.load(ckpt, model, None)

    q = quantize_checkpoint(run, "int8", tmp_path / "q")
    _flip(q / "model.safetensors")
    with pytest.raises(io.CorruptOutput, match="quantize"):
        frugallm.load(q)

    hf = frugallm.to_hf(Transformer(tiny_config()), tmp_path / "hf")
    frugallm.from_hf(hf)
    (hf / "config.json").write_text((hf / "config.json").read_text().replace('"silu"', '"gelu"'))
    with pytest.raises(io.CorruptOutput, match="config.json does not match"):
        frugallm.from_hf(hf)
    (hf / "manifest.json").unlink()  # as a Hugging Face directory written by others: read as it is
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        frugallm.from_hf(hf)


def test_old_manifests_still_load(run, tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_0000001"
    shutil.copytree(run / "checkpoints" / "step_0000001", ckpt)
    files = sorted(p.name for p in ckpt.iterdir() if p.name != "manifest.json")
    (ckpt / "manifest.json").write_text(json.dumps({n: io.sha256(ckpt / n) for n in files}))  # before io.py
    model = Transformer(tiny_config())
    assert checkpoint.load(ckpt, model, torch.optim.AdamW(model.parameters())) == {"step": 1}
    assert checkpoint.latest(tmp_path) == ckpt
    _flip(ckpt / "trainer.json", at=2)
    with pytest.raises(checkpoint.CorruptCheckpoint, match="trainer.json does not match its sha256"):
        checkpoint.verify(ckpt)
    # re-saving that step (a resume) replaces the old-format checkpoint
    checkpoint.save(tmp_path, 1, model, torch.optim.AdamW(model.parameters()), {"step": 1}, "{}",
                    model.config, TrainConfig(), keep_last=2)
    assert io.read_manifest(ckpt)["kind"] == "checkpoint"

    q = quantize_checkpoint(run, "int8", tmp_path / "q")
    names = sorted(p.name for p in q.iterdir() if p.name != "manifest.json")
    (q / "manifest.json").write_text(json.dumps({n: io.sha256(q / n) for n in names}))
    assert io.manifest_kind(q) == "quantized"
    frugallm.load(q)
    quantize_checkpoint(run, "int8", q)  # an old quantized export is frugallm's: replaced


def test_open_tells_every_kind_of_directory(run, tmp_path):
    """formats.open is the one answer to "what is this?": a run, a checkpoint, a quantized export,
    a Hugging Face directory (frugallm's exports included), and one error for anything else."""
    from frugallm.formats.open import open as open_model

    ckpt = run / "checkpoints" / "step_0000001"
    assert (open_model(run).kind, open_model(run).weights) == ("run", ckpt)
    assert (open_model(ckpt).kind, open_model(ckpt).weights) == ("checkpoint", ckpt)
    q = quantize_checkpoint(run, "int8", tmp_path / "q")
    assert open_model(q).kind == "quantized" and open_model(q).quantization["format"] == "int8"
    hf = frugallm.to_hf(Transformer(tiny_config()), tmp_path / "hf")  # has a manifest, is read by from_hf
    assert io.manifest_kind(hf) == "hf" and open_model(hf).kind == "hf" and open_model(hf).deepseek
    assert open_model(hf).config.dim == tiny_config().dim
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a frugallm run"):
        open_model(tmp_path / "notes")


def test_a_runs_tokenizer_comes_from_its_verified_checkpoint(run, tmp_path):
    """The run-level tokenizer.json is a copy no manifest covers: what reads a run's tokenizer reads its
    newest checkpoint's, verified (issue 25: a replaced copy made generate print garbage)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "checkpoints" / "step_0000001"
    own = (ckpt / "tokenizer.json").read_text()
    other = train_tokenizer(iter(["a b c d e f g " * 300]), 270)
    (copy / "tokenizer.json").write_text(other.to_str())
    assert frugallm.load_tokenizer(copy).to_str() == frugallm.load_tokenizer(ckpt).to_str() == own
    _flip(ckpt / "tokenizer.json", at=50)
    with pytest.raises(io.CorruptOutput, match="tokenizer.json does not match its sha256"):
        frugallm.load_tokenizer(ckpt)
    with pytest.raises(FileNotFoundError, match="without a checkpoint whose tokenizer.json verifies"), \
            pytest.warns(UserWarning, match="tokenizer.json does not match"):
        frugallm.load_tokenizer(copy)


def test_a_save_deletes_the_temp_directories_of_a_killed_save(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    dead = copy / "checkpoints" / ".step_0000002.tmp-k1ll3d"  # a kill -9 during save 2 leaves this
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"\0" * 1000)
    model = Transformer(tiny_config())
    checkpoint.save(copy, 3, model, torch.optim.AdamW(model.parameters()), {"step": 3}, "{}", model.config,
                    TrainConfig(), keep_last=2)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step_0000001", "step_0000003"]


def test_from_hf_closes_its_files(tmp_path):
    hf = frugallm.to_hf(Transformer(tiny_config()), tmp_path / "hf")
    with convert._Checkpoint(hf) as ckpt:
        handle, key = ckpt.handles[0], next(iter(ckpt.where))
        assert ckpt.raw(key).numel() > 0
    with pytest.raises(Exception, match="closed"):
        handle.get_tensor(key)


# --- the data cache --------------------------------------------------------------------------------

def _documents(corpus):
    """(id, text) as the in-memory path read them: each file decoded whole, .jsonl split with splitlines."""
    for path in sorted(corpus.iterdir()):
        text = path.read_bytes().decode("utf-8", errors="replace")  # single bad bytes: one U+FFFD each
        if path.suffix != ".jsonl":
            yield path.name, text
            continue
        for n, line in enumerate(text.splitlines()):
            if line.strip():
                obj = json.loads(line)
                yield f"{path.name}:{n}", obj.get("text") or obj["prompt"] + obj["completion"]


def _expected(corpus, tok, val_fraction):
    streams = {"train": [], "val": []}
    for doc, text in _documents(corpus):
        if text.strip():
            streams["val" if data.is_val(doc, val_fraction) else "train"] += [tok.bos_id, *tok.encode(text), tok.eos_id]
    return streams


def test_streamed_shards_equal_the_in_memory_tokenization(corpus):
    tok = train_tokenizer(iter([(corpus / "doc0.txt").read_text()]), 300)
    (corpus / "bad.txt").write_bytes(b"caf\xe9 ok \xff end")
    (corpus / "qa.jsonl").write_bytes(b'{"text": "hello"}\n\n{"prompt": "Q: caf\xe9", "completion": "A"}\r\n'
                                      b'{"text": "  "}\n{"text": "last"}')
    want = _expected(corpus, tok, 0.3)
    assert want["train"] and want["val"]
    splits = data.prepare(str(corpus), tok, val_fraction=0.3)
    assert np.array_equal(splits.train, want["train"]) and np.array_equal(splits.val, want["val"])
    assert splits.manifest["replaced_bytes"] == 3 and io.read_manifest(splits.directory)["kind"] == "data-cache"
    _flip(splits.directory / "train.bin")
    with pytest.raises(io.CorruptOutput, match="train.bin does not match .* delete the directory"):
        data.prepare(str(corpus), tok, val_fraction=0.3)


@pytest.mark.parametrize("val_fraction", [0.0, 1.0])  # the one document in train, or in val
def test_one_document_is_cut_into_train_and_val(tmp_path, monkeypatch, val_fraction):
    monkeypatch.setenv("FRUGALLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "one.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    tok = train_tokenizer(iter(["def return x"]), 300)
    full = sum(_expected(tmp_path / "c", tok, val_fraction).values(), [])
    cut = max(1, int(len(full) * (1 - max(val_fraction, 0.01))))
    splits = data.prepare(str(tmp_path / "c"), tok, val_fraction=val_fraction)
    assert np.array_equal(splits.train, full[:cut]) and np.array_equal(splits.val, full[cut:])
    assert splits.manifest["tokens"] == {"train": cut, "val": len(full) - cut}


def test_the_codec_error_handler_is_registered_once(monkeypatch):
    registered = []
    real = codecs.register_error
    monkeypatch.setattr(codecs, "register_error", lambda *a: registered.append(a[0]) or real(*a))
    data._replace_and_count.cache_clear()
    a, b = data._Replacements(), data._Replacements()
    for _ in range(3):
        a.decode(b"\xff")
    b.decode(b"x\xfe\xfd")
    assert (a.count, b.count) == (3, 2) and len(registered) == 1
