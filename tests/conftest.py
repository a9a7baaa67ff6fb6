import contextlib
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from frugallm import ModelConfig


@pytest.fixture(autouse=True, scope="session")
def _eager_decoding_by_default():
    """generate / chat / serve decode eagerly unless a test asks for --compile: compiling the decode step
    (the default, --compile auto) costs ~30 s per process on 2 cores, in every CLI and server test.
    FRUGALLM_COMPILE is the user's setting of that default (README); tests/test_compile_default.py
    unsets it to test the default itself. Subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRUGALLM_COMPILE", "off")
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough for exact fp64 checks in milliseconds."""
    base = dict(vocab_size=97, dim=64, n_layers=3, n_dense_layers=1, inter_dim=96, max_seq_len=64,
                n_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                moe_inter_dim=16, n_expert_groups=4, n_limited_groups=2, n_mtp=1)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def cfg() -> ModelConfig:
    return tiny_config()


def word_corpus(folder, vocabulary: str, docs: int, words_per_doc: int):
    """A folder of `docs` text files of words drawn (seeded) from `vocabulary`: a corpus a tiny run learns."""
    folder.mkdir()
    rng = random.Random(0)
    words = vocabulary.split()
    for d in range(docs):
        (folder / f"d{d}.txt").write_text(" ".join(rng.choice(words) for _ in range(words_per_doc)))
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny trained run per session (2 layers, dim 32, a 300-token BPE, 20 steps, 2048 context)."""
    from frugallm.config import get_preset
    from frugallm.train.config import TrainConfig, apply_overrides
    from frugallm.train.trainer import train

    root = tmp_path_factory.mktemp("serve")
    corpus = word_corpus(root / "corpus", "the cat sat on a mat and the dog ran to the park with a ball é ü ✓",
                         docs=8, words_per_doc=2000)
    pairs = ["dim=32", "n_layers=2", "n_dense_layers=1", "n_heads=2", "q_lora_rank=0", "kv_lora_rank=16",
             "qk_nope_head_dim=8", "qk_rope_head_dim=8", "v_head_dim=8", "n_routed_experts=4", "n_expert_groups=1",
             "n_limited_groups=1", "n_activated_experts=2", "moe_inter_dim=16", "inter_dim=64", "vocab_size=300",
             "max_seq_len=2048", "seq_len=32", "batch_size=4", "tokenizer_train_chars=50000", "warmup_steps=2",
             "eval_every=100", "eval_batches=1", "log_every=100", "sample_tokens=0", "precision=fp32",
             f"data={corpus}", "steps=20", "save_every=20"]
    model_cfg, train_cfg = apply_overrides(get_preset("tiny"), TrainConfig(), pairs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRUGALLM_CACHE", str(root / "cache"))
        train(model_cfg, train_cfg, root / "run", log=lambda line: None)
    return root / "run"


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A small code-like text corpus in a folder, with the token cache under tmp_path."""
    monkeypatch.setenv("FRUGALLM_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    words = ["def", "return", "class", "import", "self", "value", "for", "in", "if", "else", "(", ")", ":"]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for d in range(12):
        idx = torch.randint(0, len(words), (3000,), generator=g).tolist()
        (folder / f"doc{d}.txt").write_text(" ".join(words[i] for i in idx))
    return folder


@contextlib.contextmanager
def serve_process(run, key: str, *options, env: dict | None = None):
    """A real `frugallm serve RUN --api-key KEY *options` on a free loopback port, one thread; yields
    (base URL, process) once GET /health answers 200, and stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "frugallm.cli", "serve", str(run), "--port", str(port),
                             "--api-key", key, *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the server did not answer within 60 s"
            try:
                health = urllib.request.Request(base + "/health", headers={"Authorization": f"Bearer {key}"})
                with urllib.request.urlopen(health, timeout=5) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.1)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
