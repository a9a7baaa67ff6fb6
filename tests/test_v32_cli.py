"""A DeepSeek-V3.2 directory as a user meets it: written by transformers with its tokenizer (no chat
template, as the release ships none), then opened by every command that takes a model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

import frugallm
from frugallm.cli import main

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]


@pytest.fixture(scope="module")
def v32_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("v32cli") / "hf"
    torch.manual_seed(0)
    cfg = DeepseekV32Config(
        vocab_size=320, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=16, kv_lora_rank=8,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, max_position_embeddings=128,
        index_topk=4, index_n_heads=8, index_head_dim=8, num_nextn_predict_layers=0)
    DeepseekV32ForCausalLM(cfg).eval().save_pretrained(path)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["hello world, the cat sat"] * 10, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_tokens(["<think>", "</think>"])
    hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": SPECIALS[0]}, "eos_token": SPECIALS[1], "add_bos_token": True}))
    return path


def test_load_opens_the_directory_with_its_tokenizer(v32_dir):
    model = frugallm.load(v32_dir)
    assert model.config.index_topk == 4
    tok = frugallm.load_tokenizer(v32_dir)
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    assert tok.decode(ids, skip_special_tokens=False).endswith("<｜User｜>hello<｜Assistant｜></think>")


def test_generate_and_quantize_commands(v32_dir, tmp_path, capsys):
    assert main(["generate", str(v32_dir), "--prompt", "the cat sat on the", "--max-new-tokens", "12"]) == 0
    for fmt in ("int8", "fp8"):
        out = tmp_path / fmt
        assert main(["quantize", str(v32_dir), "--to", fmt, "--out", str(out)]) == 0
        assert main(["generate", str(out), "--prompt", "hello world", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count(" tokens in ") == 3  # one report per generate


def test_chat_command_over_stdin(v32_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "frugallm.cli", "chat", str(v32_dir), "--max-new-tokens", "6",
                        "--temperature", "0"], input="hello\n", capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "tokens/s]" in r.stdout
