import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from frugallm.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer


def test_byte_level_round_trip_and_specials(tmp_path):
    tok = train_tokenizer(iter(["def f(x):\n    return x + 1\n"] * 50), 300)
    text = "class Ünïcode: ✓ 0xFF\n\ttab"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any text survives
    assert [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.bos_id == 0 and tok.eos_id == 1 and tok.pad_id == 2
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.hash() == tok.hash() and again.encode(text) == tok.encode(text)
    with pytest.raises(ValueError, match="vocab_size=100 must be >= 262"):
        train_tokenizer(iter(["x"]), 100)


def test_chat_template():
    tok = train_tokenizer(iter(["hello"] * 10), 300)
    prompt = tok.chat([{"role": "user", "content": "hi"}])
    assert prompt == "<|user|>hi<|eos|><|assistant|>"
    assert tok.encode(prompt)[0] == tok.tok.token_to_id("<|user|>")
    with pytest.raises(ValueError, match="role 'bot'"):
        tok.chat([{"role": "bot", "content": "x"}])


def test_loads_a_hugging_face_tokenizer_with_its_own_specials(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.add_special_tokens(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<｜begin▁of▁sentence｜>"}, "eos_token": "<｜end▁of▁sentence｜>"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_text_stream_emits_whole_characters_only():
    tok = train_tokenizer(iter(["plain ascii text only\n"] * 20), 300)  # so é, ✓, 🙂 are split into byte tokens
    text = "a é ✓ 🙂 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[ids.index(tok.encode("🙂")[0])] == ""  # held back until its 4th byte arrives


def test_text_stream_does_not_hold_invalid_bytes_forever():
    tok = train_tokenizer(iter(["plain ascii text only\n"] * 20), 300)
    lone = tok.encode("é")[1]  # a continuation byte alone is invalid UTF-8
    stream = tok.stream()
    pieces = [stream.push(lone) for _ in range(10)]
    assert all(p == "" for p in pieces[:3]) and all(p == "\ufffd" for p in pieces[3:])  # at most 3 tokens held
    assert "".join(pieces) + stream.flush() == tok.decode([lone] * 10)
