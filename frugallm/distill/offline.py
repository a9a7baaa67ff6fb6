"""The offline teacher: its top-k next-token log-probs over the training stream, computed once, memory-mapped.

Running the teacher at every training step costs a teacher forward per student step, every epoch and
every run. Offline KD pays it once: for each training window the teacher's k most likely next tokens and
their log-probs at temperature τ are stored, and the student's loss reads them back (losses.TopK and its
rest-bucket rule). Dense storage would take V·4 bytes per token (517 KB at V = 129,280); this takes

    k·(4 + 2) + 2 bytes per token     int32 id + fp16 log-prob per entry, + one fp16 log rest mass
                                      (k = 64: 386 B)

Windows are the trainer's (train/data.py Batches): window w feeds tokens[w·S : w·S + S] and its
position t predicts token w·S + t + 1, so `get([w, ...])` lines up with Batches' (inputs, targets).

Layout, one directory per key (teacher hash, data fingerprint, seq_len, k, τ, token count) under the
root the caller gives (the trainer puts it beside its data cache):
    shard-00000.bin ...   a chunk of `chunk_windows` windows: ids int32 (n, S, k), then log-probs
                          fp16 (n, S, k), then the log rest mass fp16 (n, S); read with np.memmap
    topk.json             the key, shapes, dtypes, build time, bytes per token
    manifest.json         written last by frugallm/io.py (kind "data-cache"); verified on open
Building resumes: each finished chunk is written whole (io.write_file), then `progress.json` in a hidden
`.NAME.partial` folder beside the cache records it, atomically. A restart continues after the last
recorded chunk; only then is the directory sealed with its manifest. Two processes must not build the
same key at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import io
from .losses import TopK, safe_logsumexp

VERSION = 1
ID_DTYPE = np.dtype(np.int32)  # vocabularies pass 2^16 (Qwen: 152k), so 16-bit ids do not fit
# Log-probs in fp16, not bf16. Both take 2 bytes; the values are log-probs in about [-30, 0], far inside
# fp16's range (|x| <= 65504, and -inf is representable). fp16 keeps 10 mantissa bits to bf16's 7: a
# log-prob of -5 is off by at most 2^-9 = 0.002 (a 0.2% error in p) in fp16, 0.016 (1.6%) in bf16.
LOGPROB_DTYPE = np.dtype(np.float16)
CHUNK_BYTES = 64 << 20  # default chunk: ~64 MB of shard, built in memory, written whole


def topk_record(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """Dense teacher logits (..., V) -> TopK (..., k) in fp32: the k largest log-softmax(logits / τ),
    sorted, and the log of the mass outside them (exact: a logsumexp over the complement)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
    logp = F.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (..., V)
    lp, ids = logp.topk(k, dim=-1)  # (..., k) each, largest first
    rest = safe_logsumexp(logp.scatter(-1, ids, float("-inf")))  # (...,) -inf when k = V
    return TopK(ids, lp, rest, temperature)


def cache_key(teacher_hash: str, data_fingerprint: str, seq_len: int, k: int, temperature: float,
              n_tokens: int) -> dict:
    return {"version": VERSION, "teacher": teacher_hash, "data": data_fingerprint, "seq_len": int(seq_len),
            "k": int(k), "temperature": float(temperature), "tokens": int(n_tokens)}


def cache_dir(root: str | Path, key: dict) -> Path:
    """Where the cache for `key` lives under `root`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(root) / f"topk-{digest}"


class TopKCache:
    """A built cache, read through memory maps. `get(window_indices)` -> TopK (B, S, k)."""

    def __init__(self, directory: str | Path, verify: bool = True):
        self.directory = Path(directory)
        if verify:
            io.verify(self.directory, "data-cache")  # a flipped bit would distil toward garbage
        self.meta = json.loads((self.directory / "topk.json").read_text())
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
            self._shards[c] = _open_shard(self.directory / _shard_name(c), n, self.seq_len, self.k)
        return self._shards[c]

    def get(self, window_indices: Sequence[int] | torch.Tensor | np.ndarray) -> TopK:
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
        return TopK(torch.from_numpy(np.stack(ids).astype(np.int64)),
                    torch.from_numpy(np.stack(lp).astype(np.float32)),
                    torch.from_numpy(np.stack(rest).astype(np.float32)), self.temperature)


def _shard_name(c: int) -> str:
    return f"shard-{c:05d}.bin"


def _open_shard(path: Path, n: int, S: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three views into one shard file: ids (n, S, k), log-probs (n, S, k), rest (n, S)."""
    at_lp = n * S * k * ID_DTYPE.itemsize
    at_rest = at_lp + n * S * k * LOGPROB_DTYPE.itemsize
    return (np.memmap(path, ID_DTYPE, "r", 0, (n, S, k)),
            np.memmap(path, LOGPROB_DTYPE, "r", at_lp, (n, S, k)),
            np.memmap(path, LOGPROB_DTYPE, "r", at_rest, (n, S)))


def _window_inputs(tokens: np.ndarray, ws: range, S: int) -> torch.Tensor:
    """(len(ws), S) int64: window w's inputs, tokens[w·S : w·S + S], as Batches reads them."""
    return torch.from_numpy(np.stack([np.asarray(tokens[w * S: w * S + S], dtype=np.int64) for w in ws]))


def build_topk_cache(teacher, tokens: np.ndarray, *, root: str | Path, data_fingerprint: str, seq_len: int,
                     k: int, temperature: float = 1.0, batch_windows: int = 2, chunk_windows: int | None = None,
                     progress: bool = True, on_chunk: Callable[[int, int], None] | None = None) -> TopKCache:
    """The offline top-k cache of `teacher` over `tokens`: opened if complete, else built or resumed.

    teacher: a distill.teacher.Teacher (or anything with .hash, .vocab_size and .logits(ids (B, S)) -> (B, S, V)).
    tokens: the training token stream (train/data.py Splits.train). data_fingerprint: a string that
    changes when the stream does (e.g. the data cache's directory name). batch_windows: windows per
    teacher forward (memory: batch_windows·S·V·4 bytes of logits, twice). chunk_windows: windows per
    shard (default: ~64 MB); a resumed build keeps the interrupted one's. on_chunk(done, total) is
    called after each chunk is recorded (tests interrupt there)."""
    from tqdm import tqdm

    if not 1 <= k <= teacher.vocab_size:
        raise ValueError(f"k={k} must be in 1..{teacher.vocab_size} (the teacher's vocabulary)")
    windows = (len(tokens) - 1) // seq_len  # as Batches counts them
    if windows < 1:
        raise ValueError(f"{len(tokens):,} tokens make no window of seq_len={seq_len}")
    key = cache_key(teacher.hash, data_fingerprint, seq_len, k, temperature, len(tokens))
    directory = cache_dir(root, key)
    if io.read_manifest(directory) is not None:
        return TopKCache(directory)

    partial = directory.with_name(f".{directory.name}.partial")  # survives interruptions; hidden
    partial.mkdir(parents=True, exist_ok=True)
    state = {"key": key, "chunk_windows": chunk_windows or max(1, CHUNK_BYTES // (seq_len * (6 * k + 2))),
             "chunks_done": 0, "seconds": 0.0}
    if (partial / "progress.json").exists():
        saved = json.loads((partial / "progress.json").read_text())
        if saved.get("key") == key:
            state = saved  # resume, with the chunk size the shards on disk were written with
    cw = state["chunk_windows"]
    n_chunks = math.ceil(windows / cw)

    bar = tqdm(total=windows * seq_len, initial=min(state["chunks_done"] * cw, windows) * seq_len, unit="tok",
               unit_scale=True, desc=f"teacher top-{k}", disable=not progress)
    try:
        for c in range(state["chunks_done"], n_chunks):
            t0 = time.perf_counter()
            w0, w1 = c * cw, min((c + 1) * cw, windows)
            ids = np.empty((w1 - w0, seq_len, k), ID_DTYPE)
            lp = np.empty((w1 - w0, seq_len, k), LOGPROB_DTYPE)
            rest = np.empty((w1 - w0, seq_len), LOGPROB_DTYPE)
            for b in range(w0, w1, batch_windows):
                ws = range(b, min(b + batch_windows, w1))
                rec = topk_record(teacher.logits(_window_inputs(tokens, ws, seq_len)), k, temperature)
                ids[b - w0: b - w0 + len(ws)] = rec.ids.numpy()
                lp[b - w0: b - w0 + len(ws)] = rec.logprobs.numpy()  # fp32 -> fp16: round to nearest
                rest[b - w0: b - w0 + len(ws)] = rec.rest.numpy()
                bar.update(len(ws) * seq_len)
            # the shard whole (atomic, fsynced), THEN the record that says it is done
            io.write_file(partial / _shard_name(c), ids.tobytes() + lp.tobytes() + rest.tobytes())
            state.update(chunks_done=c + 1, seconds=state["seconds"] + time.perf_counter() - t0)
            io.write_file(partial / "progress.json", json.dumps(state, indent=2))
            if on_chunk is not None:
                on_chunk(c + 1, n_chunks)
    finally:
        bar.close()

    meta = {"key": key, "windows": windows, "chunk_windows": cw, "shards": n_chunks,
            "id_dtype": ID_DTYPE.name, "logprob_dtype": LOGPROB_DTYPE.name,
            "layout": "per shard: ids (n, S, k), logprobs (n, S, k), log rest mass (n, S); n = chunk_windows",
            "build_seconds": round(state["seconds"], 3), "shard_bytes_per_token": 6 * k + 2}
    with io.write_directory(directory, "data-cache") as tmp:
        for c in range(n_chunks):  # hard links: the partial copies stay until the sealed cache is in place
            try:
                os.link(partial / _shard_name(c), tmp / _shard_name(c))
            except OSError:
                shutil.copyfile(partial / _shard_name(c), tmp / _shard_name(c))
        (tmp / "topk.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(partial, ignore_errors=True)
    return TopKCache(directory)
