"""The training data cache on disk: tokenized splits as flat streams, memory-mapped when read.

What goes in (sources, documents, SFT records, the train / val split) is train/data.py's; this module
is the layout only. One directory per key, under io.cache_root() / ROOT unless the caller gives a root:

    train.bin, val.bin     one flat token stream per split: BOS + tokens + EOS of each document, appended
                           in order; uint16 when the vocabulary fits 2^16, else uint32 (`token_dtype`)
    train.mask, val.mask   only when some document is an SFT record: uint8, one byte per token, 1 where
                           the token is a target of the loss. No mask files means every token counts; the
                           files open at the first masked document, back-filled with 1 for the tokens before
    data.json              META: source, tokenizer hash, vocabulary, dtype, document / token / byte counts,
                           the val fraction, "masked", and "target_tokens" per split when masked
    manifest.json          written last by frugallm/io.py (kind "data-cache"); verified on every open

The directory name is the first 20 hex digits of sha256("VERSION|" + the key fields): a changed source,
tokenizer or split fraction gets a new directory, the same ones reuse the old. When one split is left
empty (too few documents to split them by id), the one stream (and its mask stream alike) is cut
instead: its head to train, the last max(val_fraction, 0.01) of it to val.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .. import io

# 3: SFT records (prompt / completion encoded apart, chat through the template) with mask streams
# 2: written through frugallm/io.py, metadata in data.json (1: in manifest.json)
VERSION = 3
KIND = "data-cache"  # io.py's manifest kind
ROOT = "data"  # the folder under io.cache_root() holding one directory per key
SPLITS = ("train", "val")
TOKENS, MASK = ".bin", ".mask"  # suffixes of a split's streams: train.bin, train.mask
META = "data.json"
MASK_DTYPE = np.dtype(np.uint8)
_BACKFILL = 1 << 24  # mask bytes written per call when back-filling (16 MB at most in memory)


@dataclass
class Splits:
    train: np.ndarray  # memory-mapped token stream
    val: np.ndarray
    manifest: dict  # data.json
    directory: Path
    train_mask: np.ndarray | None = None  # uint8 per token, 1 = a target of the loss; None: all targets
    val_mask: np.ndarray | None = None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def directory(key: Sequence, root: Path | None = None) -> Path:
    """Where the cache of `key` (the fields that decide its content, each formatted by str) lives."""
    text = "|".join(str(field) for field in (VERSION, *key))
    return (root or io.cache_root() / ROOT) / hashlib.sha256(text.encode()).hexdigest()[:20]


def is_built(path: Path) -> bool:
    """A complete cache is one sealed by its manifest (a build that did not finish left none)."""
    return io.read_manifest(path) is not None


def open_splits(path: Path) -> Splits:
    """The built cache at `path`, verified first (a few ms per 10 MB; a flipped bit would train on
    garbage), its streams memory-mapped read-only."""
    io.verify(path, KIND)
    manifest = json.loads((path / META).read_text())
    load = lambda name, dtype: np.memmap(path / name, dtype=dtype, mode="r")
    masks = [load(f"{split}{MASK}", MASK_DTYPE) if manifest.get("masked") else None for split in SPLITS]
    return Splits(load(f"train{TOKENS}", manifest["dtype"]), load(f"val{TOKENS}", manifest["dtype"]), manifest,
                  path, *masks)


@contextlib.contextmanager
def write(path: Path, vocab_size: int) -> Iterator["Writer"]:
    """A Writer filling a temp dir beside `path`; sealed and swapped in (io.write_directory) when the
    block ends after Writer.finish, deleted on an error."""
    with io.write_directory(path, KIND) as tmp:
        with contextlib.ExitStack() as files:
            writer = Writer(tmp, vocab_size, files)
            yield writer
        if not writer.finished:
            raise RuntimeError("data_cache.write: call Writer.finish before the block ends")


class Writer:
    """Appends documents to the split streams, bounded memory: each document is written as it comes."""

    def __init__(self, tmp: Path, vocab_size: int, files: contextlib.ExitStack):
        self.tmp, self.vocab_size, self.dtype, self._files = tmp, vocab_size, token_dtype(vocab_size), files
        self.tokens, self.documents, self.targets = ({s: 0 for s in SPLITS} for _ in range(3))
        self._out = {s: files.enter_context(open(tmp / f"{s}{TOKENS}", "wb")) for s in SPLITS}
        self._masks = {}  # split -> its .mask file, opened at the first masked document
        self.finished = False

    @property
    def masked(self) -> bool:
        return bool(self._masks)

    def append(self, split: str, ids: Sequence[int], mask: Sequence[int] | None = None) -> None:
        """One document's ids (BOS and EOS included) to `split`; mask: 1 per target token, None: all targets."""
        if mask is not None and not self._masks:
            self._open_masks()
        self._out[split].write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self._masks:
            mask = np.ones(len(ids), MASK_DTYPE) if mask is None else np.asarray(mask, MASK_DTYPE)
            self._masks[split].write(mask.tobytes())
            self.targets[split] += int(mask.sum())
        self.tokens[split] += len(ids)
        self.documents[split] += 1

    def _open_masks(self) -> None:  # the tokens written before it are plain text: all targets
        for split in SPLITS:
            self._masks[split] = self._files.enter_context(open(self.tmp / f"{split}{MASK}", "wb"))
            for start in range(0, self.tokens[split], _BACKFILL):
                self._masks[split].write(np.ones(min(_BACKFILL, self.tokens[split] - start), MASK_DTYPE).tobytes())
            self.targets[split] = self.tokens[split]

    def finish(self, *, source: str, tokenizer_hash: str, n_bytes: int, replaced_bytes: int,
               val_fraction: float) -> dict:
        """Close the streams, cut the one stream if a split is empty, write META; returns it."""
        self._files.close()
        if not sum(self.documents.values()):
            raise ValueError("no document was appended; a data cache needs at least one")
        if self.tokens["val"] == 0 or self.tokens["train"] == 0:
            self._cut(val_fraction)
        masked = self.masked
        meta = {
            "source": source, "tokenizer_hash": tokenizer_hash, "vocab_size": self.vocab_size,
            "dtype": self.dtype.name, "documents": self.documents, "tokens": self.tokens, "bytes": n_bytes,
            "replaced_bytes": replaced_bytes, "val_fraction": val_fraction,
            "masked": masked, **({"target_tokens": self.targets} if masked else {}),
        }
        (self.tmp / META).write_text(json.dumps(meta, indent=2))
        self.finished = True
        return meta

    def _cut(self, val_fraction: float) -> None:
        """Too few documents for a document split: cut the one token stream (and its mask stream
        alike), its head to train."""
        tmp, full = self.tmp, sum(self.tokens.values())
        cut = max(1, int(full * (1 - max(val_fraction, 0.01))))
        for suffix, kind in [(TOKENS, self.dtype)] + ([(MASK, MASK_DTYPE)] if self.masked else []):
            if self.tokens["train"] == 0:
                os.replace(tmp / f"val{suffix}", tmp / f"train{suffix}")
            np.memmap(tmp / f"train{suffix}", dtype=kind, mode="r")[cut:].tofile(tmp / f"val{suffix}")
            os.truncate(tmp / f"train{suffix}", cut * kind.itemsize)
        if self.masked:
            head = int(np.memmap(tmp / f"train{MASK}", dtype=MASK_DTYPE, mode="r").sum(dtype=np.int64))
            self.targets = {"train": head, "val": sum(self.targets.values()) - head}
        self.tokens = {"train": cut, "val": full - cut}
