"""Continuous batching: one worker thread owns the model and steps every running request in one batch.

Each request choice is a `Job`. The worker loops; each turn of the loop is one *step*:
  1. admit waiting jobs, FIFO, while a slot is free and the cache fits the budget (below);
  2. drop jobs whose client went away (a disconnect, a timeout): their rows are free for this step;
  3. prefill: every job still reading its prompt advances by one chunk, all of them in one forward
     (right-padded, each row at its own cache position; at most `prefill_chunk` new tokens in all);
  4. decode: every job past its prompt feeds its last token, all of them in one (B, 1) forward.
New jobs therefore join at step boundaries, a long prompt is read a chunk per step between decode steps
instead of stalling the others, and a finished job leaves at once.

The `round-robin` policy is the reference twin (and the engine this one replaced): one request per forward,
in turn, its whole prompt in its first turn. `benchmarks/bench_serve.py` measures both in one run.

V4's hybrid attention: a HybridCache per request, one forward per length (caches.py HybridRows).

A request's output does not depend on what else runs with it: its cache row holds only its own tokens, its
attention sees only its own positions (the cache's per-row mask), sampling uses its own generator (`seed`)
and its own penalties; only the matmuls' blocking changes with the batch size, at the level of rounding.

The cache (model/kv_cache.py) is one (rows, T) block per layer and buffer (latents, rope keys and, with DSA,
the indexer's keys: moving or copying a row moves all of them): decoding jobs in rows [0, n_dec), prefilling
jobs in the rows after them, so that each forward runs on a slice (a view, no copy); moving a job is a row
swap. T is the longest reservation (prompt + max_tokens) among the jobs admitted. A job waits until
(running jobs + 1) * T fits `max_cache_tokens`, the budget of all jobs together; the block grows (and shrinks
once idle) as jobs come, so its memory stays within the budget.

Per job the worker turns tokens into text (`Tokenizer.stream`, whole characters only), cuts at the first
stop string (holding back any tail that could still become one) and posts events to the job's queue:
  ("prompt", entries)                       once, first, when the job asked for prompt log-probs (echo)
  ("text", delta: str, entries)             zero or more; entries: the log-prob records of its tokens
  ("done", finish_reason, usage: dict)      finish_reason "stop" (eos or a stop string) or "length"
  ("error", "internal error")               instead of "done", when a step fails: the detail goes to the
                                            log (logger "frugallm.server") with the job's rid
A log-prob record is (token id, log-prob, [(id, log-prob)] alternatives) (sampling.py `choose`); a prompt's
first record has log-prob None. Torch runs only on the worker thread, so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..tokenizer import TextStream, Tokenizer
from ..model.kv_cache import KVCache
from .caches import HybridRows, hybrid_decode
from .sampling import adjust, choose, greedy, prompt_entries

log = logging.getLogger("frugallm.server")
POLICIES = ("batch", "round-robin")


class QueueFull(Exception):
    """`max_queue` jobs are already waiting."""


@dataclass(eq=False)  # a job is itself: `in` and `remove` go by identity
class Job:
    prompt: list[int]
    max_tokens: int  # 0: read the prompt only (its log-probs, for echo)
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k: each token's log-prob and k alternatives
    prompt_logprobs: bool = False  # echo: the prompt's log-probs too (with `logprobs` alternatives)
    rid: str = ""  # the request id, for the log
    # set by Engine.submit
    queue: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    submitted: float = 0.0
    # worker-side state
    row: int | None = None
    read: int = 0  # prompt tokens in the cache
    last: int = 0  # the token the next decode step feeds
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # (V,) tokens generated so far, for the penalties
    bias: tuple | None = None
    text: TextStream | None = None
    held: str = ""  # decoded text not yet sent: it could be the start of a stop string
    entries: list = field(default_factory=list)  # log-prob records not yet sent
    prompt_entries: list = field(default_factory=list)
    n_tokens: int = 0
    first_token: float | None = None  # monotonic time of the first generated token
    last_time: float = 0.0  # ... and of the latest

    @property
    def cache_tokens(self) -> int:
        return len(self.prompt) + self.max_tokens

    @property
    def plain(self) -> bool:
        """Greedy with nothing to adjust or report: such rows share one argmax."""
        return (self.temperature <= 0 and self.counts is None and self.bias is None and self.logprobs is None)

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, slots: int = 16, decoder=None, max_cache_tokens: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 256, policy: str = "batch", metrics=None):
        """slots: jobs running at once. max_cache_tokens: the cache budget of all jobs together (default: slots
        full contexts). decoder: runs the decode forwards instead of the eager model (kernels/compiled.py).
        policy: "batch" (continuous batching) or "round-robin" (one job per forward; the reference).
        metrics: an object with `observe(name, value)` and `count(name, n)` (server.py Metrics), or None."""
        max_cache_tokens = max_cache_tokens or slots * model.config.max_seq_len
        if min(slots, max_cache_tokens, prefill_chunk) < 1 or max_queue < 0:
            raise ValueError(f"slots={slots}, max_cache_tokens={max_cache_tokens} and prefill_chunk={prefill_chunk} "
                             f"must be >= 1, max_queue={max_queue} >= 0")
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: choose one of {POLICIES}")
        self.hybrid = hybrid_decode(model, decoder)
        self.model, self.tokenizer, self.slots, self.decoder, self.policy = model, tokenizer, slots, decoder, policy
        self.max_cache_tokens, self.max_queue, self.prefill_chunk = max_cache_tokens, max_queue, prefill_chunk
        self.metrics = metrics
        self.stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []  # admission order
        self._rows: list[Job | None] = []  # the cache's rows: decoding [0, n_dec), then prefilling, then free
        self._n_dec = self._n_pre = 0
        self.cache: KVCache | HybridRows | None = None
        self._turn = 0  # round-robin: whose turn it is
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="frugallm-engine", daemon=True)
        self._thread.start()

    # --- event-loop side
    def submit(self, job: Job) -> Job:
        """Queue the job; QueueFull when max_queue jobs wait, ValueError when it can never fit the budget."""
        if job.cache_tokens > self.max_cache_tokens:
            raise ValueError(f"the job needs {job.cache_tokens} cache tokens; the budget is {self.max_cache_tokens}")
        job.loop, job.queue, job.submitted = asyncio.get_running_loop(), asyncio.Queue(), time.monotonic()
        with self._wake:
            if len(self._pending) >= self.max_queue and (self._pending or not self._fits(job)):
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        job.cancelled = True  # the worker frees its row at the next step boundary
        with self._wake:
            if job in self._pending:  # never admitted: it holds nothing, and leaves the queue now
                self._pending.remove(job)
            self._wake.notify()

    def queue_stats(self) -> dict:
        with self._wake:
            return {"active": len(self._active), "queued": len(self._pending), "slots": self.slots,
                    "max_queue": self.max_queue, "cache_tokens_reserved": self._reserved(self._active),
                    "max_cache_tokens": self.max_cache_tokens}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)

    # --- admission (under self._wake)
    @staticmethod
    def _reserved(jobs) -> int:
        """The cache the jobs hold: one row each, as long as the longest reservation."""
        return len(jobs) * max((j.cache_tokens for j in jobs), default=0)

    def _fits(self, job: Job) -> bool:
        return len(self._active) < self.slots and self._reserved([*self._active, job]) <= self.max_cache_tokens

    # --- worker side
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._active and not self._pending:
                    if self.cache is not None:
                        self.cache, self._rows = None, []  # idle: give the cache's memory back
                    self._wake.wait()
                if self._closed:
                    break
                admitted = []
                while self._pending and self._fits(self._pending[0]):  # FIFO: a big job is not overtaken
                    admitted.append(self._pending.popleft())
                    self._active.append(admitted[-1])
            for job in admitted:
                try:
                    self._place(job)
                except Exception:  # this job only (the server checks requests first; a library caller may not)
                    log.exception("request %s failed", job.rid)
                    job.post("error", "internal error")
                    self._finish(job)
            try:
                for job in [j for j in self._active if j.cancelled]:
                    self._finish(job)
                if self.policy == "batch":
                    self._step_batch()
                else:
                    self._step_round_robin()
            except Exception:  # a failed step: report it to the jobs in it, start over with an empty cache
                log.exception("a generation step failed (requests %s)", ", ".join(j.rid for j in self._active))
                with self._wake:
                    failed, self._active = self._active, []
                for job in failed:
                    job.row = None
                    job.post("error", "internal error")
                self.cache, self._rows, self._n_dec, self._n_pre = None, [], 0, 0
        for job in self._active + list(self._pending):
            if not job.cancelled:
                job.post("error", "the server is shutting down")
        self._active, self._pending = [], collections.deque()

    def _step_batch(self) -> None:
        if self._n_pre:
            self._prefill(self._n_dec, self._n_dec + self._n_pre, max(1, self.prefill_chunk // self._n_pre))
        if self._n_dec:
            self._decode(0, self._n_dec)

    def _step_round_robin(self) -> None:
        if not self._active:
            return
        job = self._active[self._turn % len(self._active)]
        self._turn += 1
        while not job.cancelled and job.row is not None and job.read < len(job.prompt):
            self._prefill(job.row, job.row + 1, self.prefill_chunk)  # the whole prompt, chunk by chunk
        if not job.cancelled and job.row is not None and job.row < self._n_dec:
            self._decode(job.row, job.row + 1)

    # --- rows of the cache
    def _place(self, job: Job) -> None:
        """Give an admitted job a row after the prefilling ones, growing the cache block if needed."""
        V = self.model.config.vocab_size
        bad = [t for t in job.prompt if not 0 <= t < V] or [t for t in job.logit_bias if not 0 <= t < V]
        if bad or not job.prompt:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary [0, {V})" if bad else "empty prompt")
        job.generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        if job.presence_penalty or job.frequency_penalty:
            job.counts = torch.zeros(V)
        if job.logit_bias:
            ids = torch.tensor(list(job.logit_bias), dtype=torch.long)
            job.bias = (ids, torch.tensor(list(job.logit_bias.values()), dtype=torch.float32))
        job.text = self.tokenizer.stream()
        rows, T = len(self._active), max(j.cache_tokens for j in self._active)
        if self.cache is None or rows > self.cache.lengths.shape[0] or T > self.cache.max_len:
            self._allocate(rows, T)
        job.row = self._n_dec + self._n_pre
        self._rows[job.row] = job
        self._n_pre += 1
        self.cache.lengths[job.row] = 0
        if self.hybrid:
            self.cache.reset(job.row)

    def _allocate(self, rows: int, T: int) -> None:
        """A new block of `rows` (doubling up to `slots`, within the budget) x T; running rows move over."""
        cfg, model = self.model.config, self.model
        rows = max(rows, min(self.slots, 1 << (rows - 1).bit_length(), self.max_cache_tokens // T))
        used = self._n_dec + self._n_pre
        cache = (HybridRows(model, rows, T, self.cache if used else None, used) if self.hybrid  # caches.py
                 else KVCache(cfg, rows, T, dtype=model.embed.weight.dtype, device=model.embed.weight.device))
        if self.cache is not None and used:  # (a HybridRows has no buffers: its caches carried over)
            t = min(T, self.cache.max_len)
            for new, old in zip(cache.buffers(), self.cache.buffers()):  # latents, rope keys, indexer keys
                for a, b in zip(new, old):
                    a[:used, :t] = b[:used, :t]
            cache.lengths[:used] = self.cache.lengths[:used]
        self.cache = cache
        self._rows = self._rows[:used] + [None] * (rows - used)

    def _swap(self, i: int, j: int) -> None:
        if i == j:
            return
        c = self.cache
        for buffers in c.buffers():
            for b in buffers:
                b[[i, j]] = b[[j, i]]
        c.lengths[[i, j]] = c.lengths[[j, i]]
        if self.hybrid:
            c.swap(i, j)
        self._rows[i], self._rows[j] = self._rows[j], self._rows[i]
        for r in (i, j):
            if self._rows[r] is not None:
                self._rows[r].row = r

    def _view(self, a: int, b: int) -> KVCache:
        return self.cache.rows(a, b)

    # --- model steps
    @torch.inference_mode()
    def _prefill(self, a: int, b: int, chunk: int) -> None:
        """The next chunk of the prompts of the jobs in rows [a, b), in one right-padded forward."""
        jobs, lengths = self._rows[a:b], self.cache.lengths[a:b].tolist()
        limit = min(self.cache.max_len, self.model.config.max_seq_len)
        take = [min(len(j.prompt) - j.read, chunk) for j in jobs]
        # padding is written past a shorter row's length (stale, masked, overwritten later): keep it in bounds
        S = min(max(take), min(limit - n for n in lengths))
        take = [min(t, S) for t in take]
        ids = torch.zeros(len(jobs), S, dtype=torch.long)
        for r, (job, t) in enumerate(zip(jobs, take)):
            ids[r, :t] = torch.tensor(job.prompt[job.read:job.read + t])
        every = any(j.prompt_logprobs for j in jobs)  # echo needs every position's logits
        at = None if every else torch.tensor([[t - 1] for t in take])
        t0 = time.perf_counter()
        view = self._view(a, b)  # hybrid: each row reads its own tokens only, no padding (caches.py)
        logits = (view.forward(ids, take, at) if self.hybrid else self.model(ids, cache=view, logits_at=at).logits
                  ).float()  # (B, S or 1, V)
        self._count("prefill_tokens", sum(take), time.perf_counter() - t0)
        for r, (job, t, n) in enumerate(zip(jobs, take, lengths)):
            self.cache.lengths[a + r] = n + t
            if job.prompt_logprobs:
                job.prompt_entries += prompt_entries(job.prompt, logits[r, :t], job.read, job.logprobs or 0)
            job.read += t
        done = [(job, logits[r, take[r] - 1 if every else 0]) for r, job in enumerate(jobs)
                if job.read == len(job.prompt)]
        for job, last in done:
            if job.prompt_logprobs:
                job.post("prompt", job.prompt_entries)
            self._swap(job.row, self._n_dec)  # into the decoding rows
            self._n_dec, self._n_pre = self._n_dec + 1, self._n_pre - 1
            if job.max_tokens == 0:
                self._finish(job, "length")
            else:
                self._sample([job], last[None])

    @torch.inference_mode()
    def _decode(self, a: int, b: int) -> None:
        """One token for each job in rows [a, b)."""
        jobs = self._rows[a:b]
        if self.decoder:  # a compiled graph per batch size: pad the batch to a power of two with spare rows
            b = a + min(1 << (len(jobs) - 1).bit_length(), len(self._rows) - a)  # (their lengths are put back)
        ids = torch.tensor([[j.last] for j in jobs] + [[0]] * (b - a - len(jobs)))
        view = self._view(a, b)
        before = view.lengths.clone()
        t0 = time.perf_counter()
        step = self.decoder or (lambda x, c: self.model(x, cache=c, absorb=True))
        logits = view.forward(ids, [1] * len(jobs), None) if self.hybrid else step(ids, view).logits
        view.lengths.copy_(before)
        view.lengths[:len(jobs)] += 1
        self._count("decode_tokens", len(jobs), time.perf_counter() - t0)
        self._sample(jobs, logits[:len(jobs), -1])

    def _sample(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """The next token of each job from its logits row (B, V); greedy plain rows share one argmax."""
        tokens = greedy(logits).tolist()
        records = [None] * len(jobs)
        for i, job in enumerate(jobs):
            if not job.plain:
                x = adjust(logits[i], job.counts, job.presence_penalty, job.frequency_penalty, job.bias)
                tokens[i], records[i] = choose(x, job.temperature, job.top_k, job.top_p, job.generator, job.logprobs)
                if job.counts is not None:
                    job.counts[tokens[i]] += 1
        now = time.monotonic()
        for job, token, record in zip(jobs, tokens, records):
            if job.first_token is None:
                job.first_token = now
                self._observe("ttft", now - job.submitted)
            else:
                self._observe("itl", now - job.last_time)
            job.last_time = now
            self._accept(job, token, record)

    def _accept(self, job: Job, token: int, record) -> None:
        job.n_tokens += 1
        job.last = token
        if token in self.stop_ids:
            return self._finish(job, "stop")
        if record is not None:
            job.entries.append(record)
        if self._emit(job, job.text.push(token)):
            return self._finish(job, "stop", flush=False)
        if job.n_tokens >= job.max_tokens:
            self._finish(job, "length")

    # --- events
    def _emit(self, job: Job, delta: str) -> bool:
        """Send `delta` up to the first stop string; True when one was hit."""
        text = job.held + delta
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            job.held = ""
            self._post_text(job, text[:cut])
            return True
        keep = max((n for s in job.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)  # the longest tail that starts a stop string
        job.held = text[len(text) - keep:] if keep else ""
        if len(text) > keep:
            self._post_text(job, text[:len(text) - keep])
        return False

    def _post_text(self, job: Job, text: str) -> None:
        if text or job.entries:
            job.post("text", text, job.entries)
            job.entries = []

    def _finish(self, job: Job, reason: str | None = None, flush: bool = True) -> None:
        """Free the job's row and slot; with a reason, send the rest of its text and "done"."""
        if job.row is not None and self._rows[job.row] is job:
            self._release(job.row)
        job.row = None
        with self._wake:
            if job in self._active:
                self._active.remove(job)
        if reason is None or job.cancelled:
            return
        if flush:  # the end of an unfinished character, and text held back for a stop string that never came
            if self._emit(job, job.text.flush() if job.text else ""):
                reason = "stop"
            else:
                self._post_text(job, job.held)
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": job.n_tokens,
                 "total_tokens": len(job.prompt) + job.n_tokens}
        job.post("done", reason, usage)

    def _release(self, r: int) -> None:
        """Free row r, keeping decoding rows first and prefilling rows right after them."""
        if r < self._n_dec:
            self._swap(r, self._n_dec - 1)
            self._n_dec -= 1
            r = self._n_dec
            self._swap(r, self._n_dec + self._n_pre)  # the last prefilling row fills the hole
            r = self._n_dec + self._n_pre
        else:
            self._swap(r, self._n_dec + self._n_pre - 1)
            self._n_pre -= 1
            r = self._n_dec + self._n_pre
        self._rows[r] = None

    def _count(self, name: str, n: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.count(name, n, seconds)

    def _observe(self, name: str, value: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(name, value)
