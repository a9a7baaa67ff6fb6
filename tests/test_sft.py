"""SFT records (loss masks through the data pipeline) and the teacher samples of sequence-level KD."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_tokenizer import HF_SPECIALS, hf_tokenizer_dir

from frugallm import Transformer
from frugallm.distill import sequences as gen
from frugallm.tokenizer import load_tokenizer, train_tokenizer
from frugallm.train import data

WORDS = "the cat sat on a mat and the dog ran to the park with a ball".split()


@pytest.fixture
def tok():
    return train_tokenizer(iter([" ".join(WORDS)] * 20), 300)


def _words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _expected(tok, name, records, val_fraction):
    """The (tokens, mask) streams per split, built by hand from the records."""
    streams = {"train": ([], []), "val": ([], [])}
    for n, r in enumerate(records):
        ids, mask = streams["val" if data.is_val(f"{name}:{n}", val_fraction) else "train"]
        if "text" in r:
            body = [tok.bos_id, *tok.encode(r["text"]), tok.eos_id]
            ids += body
            mask += [1] * len(body)
        else:
            p, c = tok.encode(r["prompt"]), tok.encode(r["completion"])
            ids += [tok.bos_id, *p, *c, tok.eos_id]
            mask += [0] * (1 + len(p)) + [1] * (len(c) + 1)
    return streams


def test_prompt_completion_loss_is_on_the_completion_and_eos_only(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("FRUGALLM_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    records = [{"prompt": _words(rng, rng.randint(3, 12)) + " ?", "completion": " " + _words(rng, rng.randint(1, 9))}
               for _ in range(60)] + [{"text": _words(rng, 30)}]  # a plain-text document among them: all targets
    path = _write_jsonl(tmp_path / "sft.jsonl", records)
    splits = data.prepare(str(path), tok, val_fraction=0.2)
    want = _expected(tok, "sft.jsonl", records, 0.2)
    assert splits.manifest["masked"] and splits.train_mask is not None and splits.val_mask is not None
    for split in ("train", "val"):
        ids, mask = want[split]
        assert np.array_equal(getattr(splits, split), ids) and np.array_equal(getattr(splits, f"{split}_mask"), mask)
        assert splits.manifest["target_tokens"][split] == sum(mask)
    S = 16
    batches = data.Batches(splits.train, S, 4, seed=3, mask=splits.train_mask)
    mask = np.asarray(want["train"][1])
    for index in range(5):
        x, y = batches.get(index)
        for row, w in enumerate(batches.window_ids(index)):
            nxt = torch.as_tensor(np.asarray(splits.train[w * S + 1: w * S + S + 1], dtype=np.int64))
            is_target = torch.as_tensor(mask[w * S + 1: w * S + S + 1] == 1)
            assert torch.equal(y[row], torch.where(is_target, nxt, -100))  # -100 exactly on prompt tokens (and bos)
            assert torch.equal(x[row], torch.as_tensor(np.asarray(splits.train[w * S: w * S + S], dtype=np.int64)))
    # the unigram baseline counts target tokens only
    t, v = np.asarray(want["train"][0]), np.asarray(want["val"][0])
    tm, vm = mask == 1, np.asarray(want["val"][1]) == 1
    counts = np.bincount(t[tm], minlength=tok.vocab_size) + 1.0
    by_hand = -np.log(counts / counts.sum())[v[vm]].mean()
    got = data.unigram_loss(splits.train, splits.val, tok.vocab_size, splits.train_mask, splits.val_mask)
    assert got == pytest.approx(by_hand)


@pytest.mark.parametrize("val_fraction", [0.0, 1.0])  # every record in train, or in val: one stream, cut
def test_the_one_stream_cut_cuts_the_mask_alike(tmp_path, monkeypatch, tok, val_fraction):
    monkeypatch.setenv("FRUGALLM_CACHE", str(tmp_path / "cache"))
    records = [{"prompt": "the cat sat on", "completion": " a mat and the dog ran"}] * 3
    path = _write_jsonl(tmp_path / "few.jsonl", records)
    want = _expected(tok, "few.jsonl", records, val_fraction)
    ids, mask = (a + b for a, b in zip(want["train"], want["val"]))
    cut = max(1, int(len(ids) * (1 - max(val_fraction, 0.01))))
    splits = data.prepare(str(path), tok, val_fraction=val_fraction)
    assert np.array_equal(splits.train, ids[:cut]) and np.array_equal(splits.val, ids[cut:])
    assert np.array_equal(splits.train_mask, mask[:cut]) and np.array_equal(splits.val_mask, mask[cut:])
    assert splits.manifest["target_tokens"] == {"train": sum(mask[:cut]), "val": sum(mask[cut:])}


def test_plain_text_has_no_mask_and_unchanged_tokens(tmp_path, corpus, tok):
    splits = data.prepare(str(corpus), tok, val_fraction=0.2)
    assert splits.train_mask is None and splits.val_mask is None and not splits.manifest["masked"]
    assert not list(splits.directory.glob("*.mask"))
    text = (corpus / "doc0.txt").read_text()
    doc0 = [tok.bos_id, *tok.encode(text), tok.eos_id]
    stream = splits.val if data.is_val("doc0.txt", 0.2) else splits.train
    starts = np.flatnonzero(np.asarray(stream) == tok.bos_id)
    assert any(np.array_equal(stream[s: s + len(doc0)], doc0) for s in starts)
    b = data.Batches(splits.train, 32, 4, seed=1)
    for index in (0, 3):
        x, y = b.get(index)
        assert (y != -100).all()
        rows = [np.asarray(splits.train[w * 32: w * 32 + 33], dtype=np.int64) for w in b.window_ids(index)]
        assert torch.equal(torch.cat([x, y[:, -1:]], 1), torch.as_tensor(np.stack(rows)))
    v = data.val_batches(splits.val, 32, 4)
    assert v.window_ids(0) == list(range(v.batch_size))


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"},
        {"role": "assistant", "content": "sat on a mat"}, {"role": "user", "content": "<|eos|>and the dog"},
        {"role": "assistant", "content": "ran to the park"}]


def _targets(tok, ids, mask):
    """The decoded runs of consecutive target tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_chat_masks_with_the_frugallm_template(tmp_path, monkeypatch, tok):
    ids, mask = tok.encode_chat_masked(CHAT)
    assert ids == tok.encode_chat(CHAT, add_generation_prompt=False) and len(mask) == len(ids)
    assert _targets(tok, ids, mask) == ["sat on a mat<|eos|>", "ran to the park<|eos|>"]
    ids2, mask2 = tok.encode_chat_masked(CHAT[:2], add_generation_prompt=True)
    assert ids2 == tok.encode_chat(CHAT[:2]) and not any(mask2)  # a prompt alone has no targets
    # through the data pipeline: records of messages get the same (ids, mask)
    monkeypatch.setenv("FRUGALLM_CACHE", str(tmp_path / "cache"))
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
    splits = data.prepare(str(path), tok, val_fraction=0.0)
    full = np.concatenate([splits.train, splits.val]), np.concatenate([splits.train_mask, splits.val_mask])
    assert np.array_equal(full[0], ids * 4) and np.array_equal(full[1], mask * 4)
    _write_jsonl(path, [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(ValueError, match="line 1: 'messages' must be"):
        data.prepare(str(path), tok)


# ChatML-shaped: the turn ends at a control token, then a newline that is no target
TURNS = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}"
         "<｜end▁of▁sentence｜>\n{% else %}<｜User｜>{{ m['content'] }}\n{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


@pytest.mark.parametrize("template", ["deepseek", "turns"])
def test_chat_masks_with_a_hugging_face_template(tmp_path, template):
    from test_tokenizer import HF_TEMPLATE

    tok = load_tokenizer(hf_tokenizer_dir(tmp_path, HF_TEMPLATE if template == "deepseek" else TURNS))
    special = {t: tok.tok.token_to_id(t) for t in HF_SPECIALS}
    chat = [m for m in CHAT if m["role"] != "system"]
    ids, mask = tok.encode_chat_masked(chat)
    assert ids == tok.encode_chat(chat, add_generation_prompt=False) and len(mask) == len(ids)
    eos = "<｜end▁of▁sentence｜>"
    assert _targets(tok, ids, mask) == [f"sat on a mat{eos}", f"ran to the park{eos}"]
    assert mask[ids.index(special["<｜Assistant｜>"])] == 0  # the role marker is context
    if template == "turns":
        assert ids[-1] == tok.encode("\n")[0] and mask[-1] == 0  # after the turn's end: no target


def test_masked_loss_is_the_mean_over_target_positions(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("FRUGALLM_CACHE", str(tmp_path / "cache"))
    rng = random.Random(1)
    records = [{"prompt": _words(rng, 8), "completion": " " + _words(rng, 4)} for _ in range(40)]
    splits = data.prepare(str(_write_jsonl(tmp_path / "sft.jsonl", records)), tok, val_fraction=0.0)
    x, y = data.Batches(splits.train, 24, 3, seed=0, mask=splits.train_mask).get(1)
    assert (y == -100).any() and (y != -100).any()
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, n_mtp=0)).double().eval()
    out = model(x, targets=y)
    keep = y != -100
    by_hand = F.cross_entropy(model(x).logits[keep], y[keep])
    torch.testing.assert_close(out.lm_loss.double(), by_hand)


# --- generate_samples ------------------------------------------------------------------------------

PROMPTS = [{"prompt": "the cat"}, {"messages": [{"role": "user", "content": "the dog?"}]},
           {"prompt": "a ball and"},
           {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "dropped"}]}]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_samples_writes_records_and_resumes_identically(tmp_path, tiny_run, monkeypatch):
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    kw = dict(samples_per_prompt=2, max_new_tokens=6, batch_size=3, seed=5, progress=False)
    full = tmp_path / "full.jsonl"
    stats = gen.generate_samples(tiny_run, prompts, full, **kw)
    assert stats["written"] == stats["samples"] == 8 and stats["kept"] == 0 and stats["teacher"] == "frugallm"
    records = _lines(full)
    assert [(r["prompt_index"], r["sample"]) for r in records] == [(j, i) for j in range(4) for i in range(2)]
    assert records[0]["prompt"] == "the cat" and isinstance(records[0]["completion"], str)
    assert records[3]["messages"][:-1] == PROMPTS[1]["messages"] and records[3]["messages"][-1]["role"] == "assistant"
    assert records[6]["messages"][:-1] == [{"role": "user", "content": "x"}]  # the trailing assistant turn: dropped
    assert len({r["completion"] for r in records if "completion" in r}) > 1  # sampled, not greedy

    # a crash after 4 records (mid-batch), then a restart
    crashed = tmp_path / "crashed.jsonl"
    real, calls = gen._record, []

    def crash(*args):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(gen, "_record", crash)
    with pytest.raises(KeyboardInterrupt):
        gen.generate_samples(tiny_run, prompts, crashed, **kw)
    monkeypatch.setattr(gen, "_record", real)
    assert len(_lines(crashed)) == 4
    stats = gen.generate_samples(tiny_run, prompts, crashed, **kw)
    assert (stats["kept"], stats["written"]) == (4, 4) and crashed.read_bytes() == full.read_bytes()

    # a torn last line (a crash mid-write) is dropped and written again
    torn = tmp_path / "torn.jsonl"
    lines = full.read_bytes().splitlines(keepends=True)
    torn.write_bytes(b"".join(lines[:5]) + lines[5][:20])
    assert gen.generate_samples(tiny_run, prompts, torn, **kw)["written"] == 3
    assert torn.read_bytes() == full.read_bytes()
    assert gen.generate_samples(tiny_run, prompts, torn, **kw)["written"] == 0  # all there: nothing to do
    # another prompts file against the same output is refused
    other = _write_jsonl(tmp_path / "other.jsonl", [{"prompt": "something else"}])
    with pytest.raises(ValueError, match="not a sample of this prompts file"):
        gen.generate_samples(tiny_run, other, torn, **kw)


def test_generate_samples_never_truncates_a_file_it_did_not_write(tmp_path, tiny_run):
    """Issue 25: a notes file without a final newline, and a copy of a tokenizer.json (one line), became 0
    bytes, even when the teacher did not exist. Teacher and prompts are checked before --out is touched,
    and only a torn last line after records of this very job is cut."""
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"remember: call the bank about the mortgage today")  # no final newline
    tok = tmp_path / "tokenizer.json"
    tok.write_text((tiny_run / "tokenizer.json").read_text())
    files = {path: path.read_bytes() for path in (notes, tok)}
    kw = dict(max_new_tokens=4, temperature=0.0, progress=False)
    for path in files:
        with pytest.raises(FileNotFoundError, match="nonexistent"):
            gen.generate_samples(tmp_path / "nonexistent", prompts, path, **kw)
        with pytest.raises(ValueError, match=f"{path} line 1 is not a sample of this prompts file"):
            gen.generate_samples(tiny_run, prompts, path, **kw)
        with pytest.raises(FileNotFoundError):
            gen.generate_samples(tiny_run, tmp_path / "no-prompts.jsonl", path, **kw)
    assert {path: path.read_bytes() for path in files} == files


def test_generate_samples_reads_text_prompt_files(tmp_path, tiny_run):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\nthe dog\n")
    out = tmp_path / "out.jsonl"
    stats = gen.generate_samples(tiny_run, prompts, out, max_new_tokens=4, temperature=0.0, progress=False)
    assert stats["written"] == 2
    assert [r["prompt"] for r in _lines(out)] == ["the cat", "the dog"]
    assert gen._cut([5, 7, 1, 1], {1}) == ([5, 7], True) and gen._cut([5, 7], {1}) == ([5, 7], False)


def test_generate_samples_with_a_transformers_teacher(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer

    from test_tokenizer import HF_TEMPLATE

    teacher = tmp_path / "teacher"
    hf_tokenizer_dir(tmp_path)  # tokenizer.json with DeepSeek-like specials (not a DeepSeek model)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_file(str(tmp_path / "tokenizer.json")),
        bos_token=HF_SPECIALS[0], eos_token=HF_SPECIALS[1])
    fast.chat_template = HF_TEMPLATE
    fast.save_pretrained(teacher)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(teacher)
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:2])
    out = tmp_path / "out.jsonl"
    stats = gen.generate_samples(teacher, prompts, out, samples_per_prompt=2, max_new_tokens=5, batch_size=4,
                                 progress=False)
    assert stats["teacher"] == "transformers" and stats["written"] == 4
    records = _lines(out)
    assert [r["prompt_index"] for r in records] == [0, 0, 1, 1]
    again = tmp_path / "again.jsonl"
    gen.generate_samples(teacher, prompts, again, samples_per_prompt=2, max_new_tokens=5, batch_size=4,
                         progress=False)
    assert again.read_bytes() == out.read_bytes()  # seeded
