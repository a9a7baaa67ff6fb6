"""The offline teacher's top-k cache on disk: per training window, the teacher's k most likely next
tokens, their log-probs and the log of the mass outside them, in shards read through memory maps.

What the records mean and how they are computed (the teacher, temperature τ, the rest bucket) is
distill/offline.py's; this module is the layout only. Per token it stores

    k·(4 + 2) + 2 bytes     int32 id + fp16 log-prob per entry, + one fp16 log rest mass (k = 64: 386 B)

One directory per key (teacher hash, data fingerprint, seq_len, k, τ, token count) under a root the
caller gives (the trainer's is ROOT beside its data cache), named "topk-" + 20 hex digits of the key's
sha256:
    shard-00000.bin ...   a chunk of `chunk_windows` windows: ids int32 (n, S, k), then log-probs
                          fp16 (n, S, k), then the log rest mass fp16 (n, S); read with np.memmap
    topk.json             META: the key, shapes, dtypes, build time, bytes per token
    manifest.json         written last by frugallm/io.py (kind "data-cache"); verified on open
A build in progress lives in a hidden `.NAME.partial` folder beside it: each finished shard written
whole (io.write_file), then PROGRESS recording it, atomically. `seal` moves the shards into the
directory and writes its manifest; only then is the cache complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import io

VERSION = 1
KIND = "data-cache"  # io.py's manifest kind
ROOT = "teacher-topk"  # the trainer's root for these caches, beside its data cache directory
META = "topk.json"
PROGRESS = "progress.json"  # in the .partial folder: the chunks recorded so far
ID_DTYPE = np.dtype(np.int32)  # vocabularies pass 2^16 (Qwen: 152k), so 16-bit ids do not fit
# Log-probs in fp16, not bf16. Both take 2 bytes; the values are log-probs in about [-30, 0], far inside
# fp16's range (|x| <= 65504, and -inf is representable). fp16 keeps 10 mantissa bits to bf16's 7: a
# log-prob of -5 is off by at most 2^-9 = 0.002 (a 0.2% error in p) in fp16, 0.016 (1.6%) in bf16.
LOGPROB_DTYPE = np.dtype(np.float16)
LAYOUT = "per shard: ids (n, S, k), logprobs (n, S, k), log rest mass (n, S); n = chunk_windows"


def shard_bytes_per_token(k: int) -> int:
    """k·(4 + 2) + 2: k ids and log-probs, one rest mass."""
    return k * (ID_DTYPE.itemsize + LOGPROB_DTYPE.itemsize) + LOGPROB_DTYPE.itemsize


def key(teacher_hash: str, data_fingerprint: str, seq_len: int, k: int, temperature: float, n_tokens: int) -> dict:
    return {"version": VERSION, "teacher": teacher_hash, "data": data_fingerprint, "seq_len": int(seq_len),
            "k": int(k), "temperature": float(temperature), "tokens": int(n_tokens)}


def directory(root: str | Path, key: dict) -> Path:
    """Where the cache for `key` lives under `root`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(root) / f"topk-{digest}"


def partial_directory(path: Path) -> Path:
    """The hidden folder a build of `path` fills; it survives interruptions."""
    return path.with_name(f".{path.name}.partial")


def is_built(path: Path) -> bool:
    return io.read_manifest(path) is not None


def shard_name(c: int) -> str:
    return f"shard-{c:05d}.bin"


def empty_shard(n: int, S: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays to fill with one shard's records: ids (n, S, k), log-probs (n, S, k), rest (n, S)."""
    return np.empty((n, S, k), ID_DTYPE), np.empty((n, S, k), LOGPROB_DTYPE), np.empty((n, S), LOGPROB_DTYPE)


def write_shard(partial: Path, c: int, ids: np.ndarray, logprobs: np.ndarray, rest: np.ndarray) -> None:
    """Shard `c` whole into the partial folder (atomic, fsynced); record it with write_progress after."""
    io.write_file(partial / shard_name(c), ids.tobytes() + logprobs.tobytes() + rest.tobytes())


def read_progress(partial: Path) -> dict | None:
    """The progress an interrupted build recorded, or None."""
    return json.loads((partial / PROGRESS).read_text()) if (partial / PROGRESS).exists() else None


def write_progress(partial: Path, state: dict) -> None:
    io.write_file(partial / PROGRESS, json.dumps(state, indent=2))


def seal(path: Path, key: dict, windows: int, chunk_windows: int, build_seconds: float) -> None:
    """Move the partial folder's shards into the complete cache at `path` (META, then io's manifest)."""
    partial, n_chunks = partial_directory(path), -(-windows // chunk_windows)
    meta = {"key": key, "windows": windows, "chunk_windows": chunk_windows, "shards": n_chunks,
            "id_dtype": ID_DTYPE.name, "logprob_dtype": LOGPROB_DTYPE.name, "layout": LAYOUT,
            "build_seconds": round(build_seconds, 3), "shard_bytes_per_token": shard_bytes_per_token(key["k"])}
    with io.write_directory(path, KIND) as tmp:
        for c in range(n_chunks):  # hard links: the partial copies stay until the sealed cache is in place
            try:
                os.link(partial / shard_name(c), tmp / shard_name(c))
            except OSError:
                shutil.copyfile(partial / shard_name(c), tmp / shard_name(c))
        (tmp / META).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(partial, ignore_errors=True)


def _open_shard(path: Path, n: int, S: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three views into one shard file: ids (n, S, k), log-probs (n, S, k), rest (n, S)."""
    at_lp = n * S * k * ID_DTYPE.itemsize
    at_rest = at_lp + n * S * k * LOGPROB_DTYPE.itemsize
    return (np.memmap(path, ID_DTYPE, "r", 0, (n, S, k)),
            np.memmap(path, LOGPROB_DTYPE, "r", at_lp, (n, S, k)),
            np.memmap(path, LOGPROB_DTYPE, "r", at_rest, (n, S)))


class Reader:
    """A built cache, read through memory maps. `read(window_indices)` -> plain tensors."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.directory = Path(path)
        if verify:
            io.verify(self.directory, KIND)  # a flipped bit would distil toward garbage
        self.meta = json.loads((self.directory / META).read_text())
        key = self.meta["key"]
        self.seq_len, self.k, self.temperature = key["seq_len"], key["k"], key["temperature"]
        self.teacher_hash, self.data_fingerprint = key["teacher"], key["data"]
        self.windows, self.chunk_windows = self.meta["windows"], self.meta["chunk_windows"]
        self.build_seconds: float = self.meta["build_seconds"]
        self._shards: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def tokens(self) -> int:
        """Positions covered: windows × seq_len."""
        return self.windows * self.seq_len

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.directory.iterdir() if f.is_file())

    @property
    def bytes_per_token(self) -> float:
        """On disk, all files included: k·6 + 2 for the shards, plus the (small) metadata."""
        return self.bytes / max(self.tokens, 1)

    def __len__(self) -> int:
        return self.windows

    def _shard(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if c not in self._shards:
            n = min(self.chunk_windows, self.windows - c * self.chunk_windows)
            self._shards[c] = _open_shard(self.directory / shard_name(c), n, self.seq_len, self.k)
        return self._shards[c]

    def read(self, window_indices: Sequence[int] | torch.Tensor | np.ndarray
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The records of windows [w, ...]: ids (B, S, k) int64, logprobs (B, S, k) and rest (B, S) fp32."""
        ws = [int(w) for w in (window_indices.tolist() if hasattr(window_indices, "tolist") else window_indices)]
        bad = [w for w in ws if not 0 <= w < self.windows]
        if bad:
            raise IndexError(f"windows {bad[:5]} are outside this cache's {self.windows} windows")
        ids, lp, rest = [], [], []
        for w in ws:
            s_ids, s_lp, s_rest = self._shard(w // self.chunk_windows)
            row = w % self.chunk_windows
            ids.append(s_ids[row])
            lp.append(s_lp[row])
            rest.append(s_rest[row])
        return (torch.from_numpy(np.stack(ids).astype(np.int64)), torch.from_numpy(np.stack(lp).astype(np.float32)),
                torch.from_numpy(np.stack(rest).astype(np.float32)))
