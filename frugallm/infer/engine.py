"""One worker thread that owns the model and serves many requests at once, for the HTTP server.

Each request is a `Job`: prompt ids, sampling settings, stop strings and an asyncio queue to report to.
The worker admits up to `slots` jobs, each with its own `generate_stream` generator (batch 1), and
round-robins `next()` over them, so every stream moves one model step per round; further jobs wait in
FIFO order. Torch runs only on this thread, so the event loop never blocks on it, and a generator is only
ever touched by the thread that runs it. A job cancelled by its client (a disconnect) is closed at the top
of the next round: its slot and its cache are freed at once.

Per job the worker turns tokens into text (`Tokenizer.stream`, whole characters only), cuts at the first
stop string (holding back any tail that could still become one) and posts events to the job's queue:
  ("text", delta: str)                      zero or more
  ("done", finish_reason, usage: dict)      finish_reason "stop" (eos or a stop string) or "length"
  ("error", message: str)                   instead of "done", when generation itself fails
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field

from ..tokenizer import TextStream, Tokenizer
from .generate import generate_stream


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # set by Engine.submit
    queue: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    # worker-side state
    gen: object = None
    text: TextStream | None = None
    held: str = ""  # decoded text not yet sent: it could be the start of a stop string
    n_tokens: int = 0

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, slots: int = 16, speculative: bool = False, decoder=None):
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        if speculative and model.config.n_mtp == 0:
            raise ValueError("speculative decoding needs the model's MTP modules, and this model has none (n_mtp=0)")
        self.model, self.tokenizer, self.slots, self.speculative = model, tokenizer, slots, speculative
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
        job.loop, job.queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._wake:
            self._pending.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        job.cancelled = True  # the worker closes it; generators must not be touched from this thread
        with self._wake:
            self._wake.notify()

    def load(self) -> dict:
        with self._wake:
            return {"active": len(self._active), "queued": len(self._pending)}

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
                while self._pending and len(self._active) < self.slots:
                    job = self._pending.popleft()
                    if not job.cancelled:
                        self._active.append(job)
                jobs = list(self._active)
            for job in jobs:
                try:
                    self._step(job)
                except Exception as e:  # report it to this request only; the other streams go on
                    job.post("error", f"{type(e).__name__}: {e}")
                    self._finish(job)
        for job in self._active + list(self._pending):
            if not job.cancelled:
                job.post("error", "the server is shutting down")
            self._finish(job)

    def _step(self, job: Job) -> None:
        if job.cancelled:
            return self._finish(job)
        try:
            if job.gen is None:
                job.text = self.tokenizer.stream()
                job.gen = generate_stream(self.model, [job.prompt], job.max_tokens, temperature=job.temperature,
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
        if job in self._active:
            with self._wake:
                self._active.remove(job)
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
