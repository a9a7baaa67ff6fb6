"""Byte-level BPE tokenizers (Hugging Face `tokenizers`) with frugallm's special tokens and chat template.

Byte-level means every UTF-8 byte has a token, so any text encodes and decodes losslessly.
Special tokens: <|bos|> <|eos|> <|pad|> and the chat roles <|system|> <|user|> <|assistant|>.
A Hugging Face checkpoint's own tokenizer.json loads as is; its bos/eos come from
tokenizer_config.json when present.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]


class Tokenizer:
    """A thin wrapper: encode/decode, special-token ids, a content hash, save/load."""

    def __init__(self, tok: _HFTokenizer, bos: str | None = "<|bos|>", eos: str | None = "<|eos|>"):
        self.tok = tok
        self.bos_id = tok.token_to_id(bos) if bos else None
        self.eos_id = tok.token_to_id(eos) if eos else None
        self.pad_id = tok.token_to_id("<|pad|>")
        self.bos_token, self.eos_token = bos, eos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self) -> "TextStream":
        """An incremental detokenizer: push token ids as they come, get back only whole characters."""
        return TextStream(self)

    def to_str(self) -> str:
        return self.tok.to_str()

    def hash(self) -> str:
        """sha256 of the serialised tokenizer: data caches are keyed on it."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_str())
        os.replace(tmp, path)
        return path

    def chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """frugallm's chat template: <|role|>content<|eos|> per message, then <|assistant|>."""
        parts = []
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"chat message role {m.get('role')!r} must be system, user or assistant")
            parts.append(f"<|{m['role']}|>{m['content']}<|eos|>")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        return "".join(parts)


class TextStream:
    """Incremental decoding for streaming output.

    One token can hold part of a UTF-8 character (byte-level BPE), and some decoders change a piece's text by
    its neighbours (a leading space), so the text of new tokens is the decode of a short window of recent
    tokens minus the decode of the window without them. Text that ends in U+FFFD (an unfinished character)
    is held back until a later token completes it, but never more than 3 tokens: a character has at most
    4 bytes, so older bytes that still decode to U+FFFD are invalid and go out as they are (a degenerate
    model can emit such bytes forever). `flush()` gives whatever is left at the end.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the context window, ids[read:] not yet emitted

    def push(self, ids: int | Iterable[int]) -> str:
        self.ids.extend([ids] if isinstance(ids, int) else ids)
        return self._step(final=False)

    def flush(self) -> str:
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        decode = lambda end: self.tokenizer.decode(self.ids[self.prefix:end])
        before, n = decode(self.read), len(self.ids)
        for end in [n] if final else range(n, max(self.read, n - 3), -1):  # hold back 0, 1 or 2 tokens
            text = decode(end)
            if final or not text.endswith("\ufffd"):
                break
        else:
            if n - 3 <= self.read:
                return ""  # up to 3 tokens may still complete a character: wait
            end = n - 3
            text = decode(end)
        if len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, end
        return text[len(before):]


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens and the 256 bytes included)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must be >= {256 + len(SPECIAL_TOKENS)} "
                         f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load tokenizer.json from a file or a directory (frugallm run or Hugging Face checkpoint)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no tokenizer.json at {path}; train one with `frugallm tokenizer train`")
    tok = _HFTokenizer.from_file(str(file))
    if tok.token_to_id("<|bos|>") is not None:
        return Tokenizer(tok)
    bos = eos = None
    cfg = file.parent / "tokenizer_config.json"
    if cfg.exists():  # a Hugging Face checkpoint names its own specials
        meta = json.loads(cfg.read_text())
        pick = lambda v: v.get("content") if isinstance(v, dict) else v
        bos, eos = pick(meta.get("bos_token")), pick(meta.get("eos_token"))
    return Tokenizer(tok, bos=bos, eos=eos)
