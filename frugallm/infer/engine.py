"""One worker thread that owns the model and serves many requests at once, for the HTTP server.

Each request is a `Job`: prompt ids, sampling settings, stop strings and an asyncio queue to report to.
The worker admits jobs in FIFO order while a slot is free AND the job's cache fits the token budget:
a job reserves len(prompt) + max_tokens cache positions (what `generate_stream` allocates) from
`max_cache_tokens`, shared by all jobs, until it ends. Each admitted job has its own `generate_stream`
generator (batch 1); the worker round-robins `next()` over them, so every stream moves one model step per
round. At most `max_queue` jobs wait; `submit` raises `QueueFull` past that (the server's 429). Torch runs
only on this thread, so the event loop never blocks on it, and a generator is only ever touched by the
thread that runs it. A job cancelled by its client (a disconnect, a timeout) leaves the queue at once, or is
closed at the top of the next round: its slot, its cache and its budget are freed.

Prefill runs in chunks of `prefill_chunk` tokens through the cache (`ChunkedPrefill`), so attention scores
are (B, H, chunk, T), never (B, H, T, T): a 30k-token prompt on DeepSeek-V2-Lite needs ~0.5 GB of
scores per chunk of 256 instead of ~58 GB; a cancelled job stops between chunks.

Per job the worker turns tokens into text (`Tokenizer.stream`, whole characters only), cuts at the first
stop string (holding back any tail that could still become one) and posts events to the job's queue:
  ("text", delta: str)                      zero or more
  ("done", finish_reason, usage: dict)      finish_reason "stop" (eos or a stop string) or "length"
  ("error", "internal error")               instead of "done", when generation itself fails; the detail
                                            goes to the log (logger "frugallm.server") with the job's rid
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
from dataclasses import dataclass, field

import torch

from ..tokenizer import TextStream, Tokenizer
from .generate import generate_stream

log = logging.getLogger("frugallm.server")
SLACK = 512 << 20  # memory budget headroom: requests in flight, event queues, allocator slack


class QueueFull(Exception):
    """`max_queue` jobs are already waiting."""


class Cancelled(Exception):
    """Raised inside a job's prefill when its client went away."""


class ChunkedPrefill:
    """The model, with prompt forwards split into chunks of `chunk` tokens through the cache.

    Every other call and attribute goes to the model itself, so `generate_stream(ChunkedPrefill(model), ...)`
    is plain generation with bounded prefill memory. Each chunk attends to the cached positions before it and
    to itself under the cache's causal mask, so the result equals one forward over the whole prompt. `check`
    runs between chunks (it may raise `Cancelled`). Row lengths must be equal (a batch-1 job, or prefill from
    an empty cache), and `logits_at` must fall in the last chunk; otherwise the forward runs whole.
    """

    def __init__(self, model, chunk: int = 256, check=None):
        self.model, self.chunk, self.check = model, chunk, check

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, cache=None, logits_at=None, **kw):
        S, c = input_ids.shape[1], self.chunk
        last = S - (S - 1) % c - 1  # the first index of the last chunk
        if (cache is None or S <= c or kw or int(cache.lengths.min()) != int(cache.lengths.max())
                or (logits_at is not None and int(logits_at.min()) < last)):
            return self.model(input_ids, cache=cache, logits_at=logits_at, **kw)
        hidden = []
        for i in range(0, last, c):  # every chunk but the last: only its hidden states are kept
            if self.check:
                self.check()
            tip = torch.full((input_ids.shape[0], 1), c - 1, dtype=torch.long, device=input_ids.device)
            hidden.append(self.model(input_ids[:, i:i + c], cache=cache, logits_at=tip).hidden)
        if self.check:
            self.check()
        out = self.model(input_ids[:, last:], cache=cache, logits_at=None if logits_at is None else logits_at - last)
        out.hidden = torch.cat([*hidden, out.hidden], dim=1)
        return out


def bytes_per_token(cfg, dtype: torch.dtype, speculative: bool = False) -> int:
    """Generation state per reserved token: the latent cache of every layer, plus, when speculative, each
    MTP depth's one-layer cache and its hidden-state history (infer/speculative.py)."""
    values = cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    if speculative:
        values += cfg.n_mtp * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.dim)
    return values * dtype.itemsize + 8  # + the int64 token id


@dataclass(eq=False)  # a job is itself: `in` and `remove` go by identity
class Job:
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    rid: str = ""  # the request id, for the log
    # set by Engine.submit
    queue: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    # worker-side state
    gen: object = None
    text: TextStream | None = None
    held: str = ""  # decoded text not yet sent: it could be the start of a stop string
    n_tokens: int = 0
    reserved: int = 0  # budget tokens held while admitted

    @property
    def cache_tokens(self) -> int:
        return len(self.prompt) + self.max_tokens

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, slots: int = 16, speculative: bool = False, decoder=None,
                 max_cache_tokens: int | None = None, max_queue: int = 64, prefill_chunk: int = 256):
        """max_cache_tokens: the cache budget of all jobs together (default: slots full contexts)."""
        max_cache_tokens = max_cache_tokens or slots * model.config.max_seq_len
        if min(slots, max_cache_tokens, prefill_chunk) < 1 or max_queue < 0:
            raise ValueError(f"slots={slots}, max_cache_tokens={max_cache_tokens} and prefill_chunk={prefill_chunk} "
                             f"must be >= 1, max_queue={max_queue} >= 0")
        if speculative and model.config.n_mtp == 0:
            raise ValueError("speculative decoding needs the model's MTP modules, and this model has none (n_mtp=0)")
        self.model, self.tokenizer, self.slots, self.speculative = model, tokenizer, slots, speculative
        self.max_cache_tokens, self.max_queue, self.prefill_chunk = max_cache_tokens, max_queue, prefill_chunk
        self._reserved = 0
        self.decoder = decoder  # e.g. a compiled decode step (infer/compiled.py); None: eager
        self.stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="frugallm-engine", daemon=True)
        self._thread.start()

    # --- event-loop side
    def submit(self, job: Job) -> Job:
        """Queue the job; QueueFull when max_queue jobs wait, ValueError when it can never fit the budget."""
        if job.cache_tokens > self.max_cache_tokens:
            raise ValueError(f"the job needs {job.cache_tokens} cache tokens; the budget is {self.max_cache_tokens}")
        job.loop, job.queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._wake:
            if len(self._pending) >= self.max_queue and (self._pending or not self._fits(job)):
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        job.cancelled = True  # the worker closes it; generators must not be touched from this thread
        with self._wake:
            if job in self._pending:  # never admitted: it holds nothing, and leaves the queue now
                self._pending.remove(job)
            self._wake.notify()

    def load(self) -> dict:
        with self._wake:
            return {"active": len(self._active), "queued": len(self._pending), "slots": self.slots,
                    "max_queue": self.max_queue, "cache_tokens_reserved": self._reserved,
                    "max_cache_tokens": self.max_cache_tokens}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)

    # --- worker side
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._active and not self._pending:
                    self._wake.wait()
                if self._closed:
                    break
                while self._pending and self._fits(self._pending[0]):  # FIFO: a big job is not overtaken
                    job = self._pending.popleft()
                    job.reserved = job.cache_tokens
                    self._reserved += job.reserved
                    self._active.append(job)
                jobs = list(self._active)
            for job in jobs:
                try:
                    self._step(job)
                except Cancelled:
                    self._finish(job)
                except Exception:  # report it to this request only; the other streams go on
                    log.exception("request %s failed in generation", job.rid)  # the detail stays in the log
                    job.post("error", "internal error")
                    self._finish(job)
        for job in self._active + list(self._pending):
            if not job.cancelled:
                job.post("error", "the server is shutting down")
            self._finish(job)

    def _fits(self, job: Job) -> bool:  # under self._wake
        return len(self._active) < self.slots and self._reserved + job.cache_tokens <= self.max_cache_tokens

    def _step(self, job: Job) -> None:
        if job.cancelled:
            return self._finish(job)
        try:
            if job.gen is None:
                job.text = self.tokenizer.stream()
                model = ChunkedPrefill(self.model, self.prefill_chunk, check=lambda: _check(job))
                job.gen = generate_stream(model, [job.prompt], job.max_tokens, temperature=job.temperature,
                                          top_k=job.top_k, top_p=job.top_p, seed=job.seed, stop=self.stop_ids,
                                          speculative=self.speculative, decoder=self.decoder)
            tokens = next(job.gen)[0].tolist()
        except StopIteration:  # the generator ran out without a stop token: the length limit
            return self._finish(job, "length")
        for token in tokens:
            job.n_tokens += 1
            if token in self.stop_ids:
                return self._finish(job, "stop")
            if self._emit(job, job.text.push(token)):
                return self._finish(job, "stop", flush=False)
            if job.n_tokens >= job.max_tokens:
                return self._finish(job, "length")

    def _emit(self, job: Job, delta: str) -> bool:
        """Send `delta` up to the first stop string; True when one was hit."""
        text = job.held + delta
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            job.held = ""
            if cut:
                job.post("text", text[:cut])
            return True
        keep = max((n for s in job.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)  # the longest tail that starts a stop string
        job.held = text[len(text) - keep:] if keep else ""
        if len(text) > keep:
            job.post("text", text[:len(text) - keep])
        return False

    def _finish(self, job: Job, reason: str | None = None, flush: bool = True) -> None:
        """Close the job's generator and slot; with a reason, send the rest of its text and "done"."""
        if job.gen is not None:
            job.gen.close()  # frees the cache now
            job.gen = None
        with self._wake:
            if job in self._active:
                self._active.remove(job)
            self._reserved -= job.reserved
            job.reserved = 0
        if reason is None or job.cancelled:
            return
        if flush:  # the end of an unfinished character, and text held back for a stop string that never came
            if self._emit(job, job.text.flush() if job.text else ""):
                reason = "stop"
            elif job.held:
                job.post("text", job.held)
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": job.n_tokens,
                 "total_tokens": len(job.prompt) + job.n_tokens}
        job.post("done", reason, usage)


def _check(job: Job) -> None:
    if job.cancelled:
        raise Cancelled


# --- sizing the budget
def rss(field: str = "VmRSS") -> int | None:
    """This process's resident memory (VmRSS) or its peak (VmHWM), in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_cache_tokens(model, slots: int, speculative: bool = False) -> int:
    """Half the memory available now (the model loaded), in tokens of generation state, at most `slots` contexts."""
    per = bytes_per_token(model.config, model.embed.weight.dtype, speculative)
    return max(1, min(slots * model.config.max_seq_len, _available_memory() // 2 // per))


def memory_budget(model, max_cache_tokens: int, prefill_chunk: int = 256, speculative: bool = False,
                  base: int | None = None) -> int:
    """Bytes the serving process should stay under: `base` (default: its RSS now, the model loaded, else the
    weights + 1 GiB), the cache budget, the largest prefill chunk's attention transient, and SLACK."""
    cfg, dtype = model.config, model.embed.weight.dtype
    if base is None:
        base = rss() or sum(p.numel() * p.element_size() for p in model.parameters()) + (1 << 30)
    T, S, H = min(cfg.max_seq_len, max_cache_tokens), min(prefill_chunk, max_cache_tokens), cfg.n_heads
    elem = dtype.itemsize
    scores = 3 * H * S * T * 4  # fp32 scores, their masked copy, the softmax (model/attention.py, naive path)
    expanded = 2 * T * H * (2 * cfg.qk_nope_head_dim + cfg.v_head_dim + cfg.qk_rope_head_dim) * elem  # K, V
    return base + max_cache_tokens * bytes_per_token(cfg, dtype, speculative) + scores + expanded + SLACK
