"""The offline teacher: its top-k next-token log-probs over the training stream, computed once, memory-mapped.

Running the teacher at every training step costs a teacher forward per student step, every epoch and
every run. Offline KD pays it once: for each training window the teacher's k most likely next tokens and
their log-probs at temperature τ are stored, and the student's loss reads them back (losses.TopK and its
rest-bucket rule). Dense storage would take V·4 bytes per token (517 KB at V = 129,280); this takes

    k·(4 + 2) + 2 bytes per token     int32 id + fp16 log-prob per entry, + one fp16 log rest mass
                                      (k = 64: 386 B)

Windows are the trainer's (train/data.py Batches): window w feeds tokens[w·S : w·S + S] and its
position t predicts token w·S + t + 1, so `get([w, ...])` lines up with Batches' (inputs, targets).

The cache's on-disk layout (one directory per key, fp16 / int32 shards, topk.json, the `.partial`
folder of a build in progress) is formats/topk_cache.py's; this module runs the teacher and turns the
stored records into TopK. Building resumes: each finished chunk is written whole, then recorded. A
restart continues after the last recorded chunk; only then is the directory sealed with its manifest.
Two processes must not build the same key at once.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..formats import topk_cache
from .losses import TopK, safe_logsumexp

CHUNK_BYTES = 64 << 20  # default chunk: ~64 MB of shard, built in memory, written whole


def topk_record(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """Dense teacher logits (..., V) -> TopK (..., k) in fp32: the k largest log-softmax(logits / τ),
    sorted, and the log of the mass outside them (exact: a logsumexp over the complement)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
    logp = F.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (..., V)
    lp, ids = logp.topk(k, dim=-1)  # (..., k) each, largest first
    rest = safe_logsumexp(logp.scatter(-1, ids, float("-inf")))  # (...,) -inf when k = V
    return TopK(ids, lp, rest, temperature)


class TopKCache(topk_cache.Reader):
    """A built cache, read through memory maps (formats/topk_cache.py). `get(window_indices)` -> TopK (B, S, k)."""

    def get(self, window_indices: Sequence[int] | torch.Tensor | np.ndarray) -> TopK:
        """The records of windows [w, ...]: ids (B, S, k) int64, logprobs (B, S, k) and rest (B, S) fp32."""
        return TopK(*self.read(window_indices), self.temperature)


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
    key = topk_cache.key(teacher.hash, data_fingerprint, seq_len, k, temperature, len(tokens))
    directory = topk_cache.directory(root, key)
    if topk_cache.is_built(directory):
        return TopKCache(directory)

    partial = topk_cache.partial_directory(directory)
    partial.mkdir(parents=True, exist_ok=True)
    per_window = seq_len * topk_cache.shard_bytes_per_token(k)
    state = {"key": key, "chunk_windows": chunk_windows or max(1, CHUNK_BYTES // per_window),
             "chunks_done": 0, "seconds": 0.0}
    saved = topk_cache.read_progress(partial)
    if saved is not None and saved.get("key") == key:
        state = saved  # resume, with the chunk size the shards on disk were written with
    cw = state["chunk_windows"]
    n_chunks = math.ceil(windows / cw)

    bar = tqdm(total=windows * seq_len, initial=min(state["chunks_done"] * cw, windows) * seq_len, unit="tok",
               unit_scale=True, desc=f"teacher top-{k}", disable=not progress)
    try:
        for c in range(state["chunks_done"], n_chunks):
            t0 = time.perf_counter()
            w0, w1 = c * cw, min((c + 1) * cw, windows)
            ids, lp, rest = topk_cache.empty_shard(w1 - w0, seq_len, k)
            for b in range(w0, w1, batch_windows):
                ws = range(b, min(b + batch_windows, w1))
                rec = topk_record(teacher.logits(_window_inputs(tokens, ws, seq_len)), k, temperature)
                ids[b - w0: b - w0 + len(ws)] = rec.ids.numpy()
                lp[b - w0: b - w0 + len(ws)] = rec.logprobs.numpy()  # fp32 -> fp16: round to nearest
                rest[b - w0: b - w0 + len(ws)] = rec.rest.numpy()
                bar.update(len(ws) * seq_len)
            # the shard whole (atomic, fsynced), THEN the record that says it is done
            topk_cache.write_shard(partial, c, ids, lp, rest)
            state.update(chunks_done=c + 1, seconds=state["seconds"] + time.perf_counter() - t0)
            topk_cache.write_progress(partial, state)
            if on_chunk is not None:
                on_chunk(c + 1, n_chunks)
    finally:
        bar.close()

    topk_cache.seal(directory, key, windows, cw, state["seconds"])
    return TopKCache(directory)
