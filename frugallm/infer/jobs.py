"""From an OpenAI request to the engine's jobs: every limit and option checked first, with errors that name
the field, the limit and the fix (the server's 400s), so that the worker only ever sees jobs it can run; and
`run_jobs`, a request's jobs run to their events, merged, within the request's deadline."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from .engine import Job, QueueFull
from .protocol import APIError, Sampling


@dataclass(frozen=True)
class Limits:
    context: int  # the model's max_seq_len
    max_cache_tokens: int  # the KV-cache budget of all requests together
    vocab_size: int  # ids both the model and the tokenizer hold: min of the two (a padded embedding is larger)
    max_choices: int  # completions (prompts x n) in one request


def jobs_for(req: Sampling, prompts: list[list[int]], max_tokens: int | None, prompt_param: str, default: int,
             logprobs: int | None, limits: Limits, echo: bool = False) -> list[Job]:
    """Check a request against the context, the cache budget and what is supported: a Job per prompt and
    choice (n), in the order of OpenAI's choice indices, or an APIError naming the field and the limit."""
    n = req.n or 1
    if len(prompts) * n > limits.max_choices:
        raise APIError(400, f"a request may ask for at most {limits.max_choices} completions (prompts x n, this "
                       f"server's --max-queue), got {len(prompts)} x {n}", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(len(x) > 256 for x in stop):  # each step scans them (engine.py `_emit`)
        raise APIError(400, f"at most 4 stop sequences of at most 256 characters, got {len(stop)} of up to "
                       f"{max(map(len, stop))}", param="stop")
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        # ASCII digits only: "²" and "٣" pass str.isdigit() but int() refuses the first
        if not (key.isascii() and key.isdigit()) or int(key) >= limits.vocab_size or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias maps token ids in [0, {limits.vocab_size}) to biases in "
                           f"[-100, 100]; got {key!r}: {value}", param="logit_bias")
        bias[int(key)] = value
    temperature = 1.0 if req.temperature is None else req.temperature
    # from 1e-6 down sampling is argmax anyway; decoding those greedily keeps subnormal temperatures
    # (5e-324 still failed after sampling.probs shifted its logits, tested) off the sampling path
    temperature = temperature if temperature >= 1e-6 else 0.0
    jobs = []
    for prompt in prompts:
        tokens = _max_tokens(prompt, max_tokens, prompt_param, default, echo, limits)
        for i in range(n):
            jobs.append(Job(prompt, tokens, temperature=temperature, top_p=req.top_p, top_k=req.top_k,
                            seed=None if req.seed is None else _seed(req.seed + i), stop=[s for s in stop if s],
                            presence_penalty=req.presence_penalty or 0.0,
                            frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias, logprobs=logprobs,
                            prompt_logprobs=echo and logprobs is not None))
    return jobs


def _seed(seed: int) -> int:
    """A seed as torch.Generator.manual_seed takes it, [-2**63, 2**64): 2**64 - 1 + i wraps to i - 1. Torch
    reads a negative seed as its 64-bit two's complement, so the wrap keeps choice 0 the n=1 reply."""
    return seed % 2**64 if seed >= 2**64 else seed


def _max_tokens(prompt: list[int], max_tokens: int | None, param: str, default: int, echo: bool, limits: Limits) -> int:
    """max_tokens for this prompt (`default`, or what fits, when not given), or an APIError naming the limit."""
    room, budget = limits.context - len(prompt), limits.max_cache_tokens
    if room < 0 or (room == 0 and not echo):
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens, but the prompt is "
                       f"{len(prompt)} tokens.", param=param, code="context_length_exceeded")
    over_budget = (f"This server's KV-cache budget (--max-cache-tokens) is {budget} tokens for all requests "
                   f"together, and a request reserves its prompt plus max_tokens: ")
    if len(prompt) > budget or (len(prompt) == budget and not echo):
        raise APIError(400, over_budget + f"the prompt alone is {len(prompt)} tokens.", param=param,
                       code="cache_budget_exceeded")
    if max_tokens is None:  # `default` tokens, or what fits
        max_tokens = min(default, room, budget - len(prompt))
    if max_tokens < (0 if echo else 1):  # echo with max_tokens 0: the prompt's log-probs only
        raise APIError(400, f"max_tokens must be at least {0 if echo else 1}, got {max_tokens}", param="max_tokens")
    if max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens: the prompt's "
                       f"{len(prompt)} tokens plus max_tokens={max_tokens} exceed it (at most {room}).",
                       param="max_tokens", code="context_length_exceeded")
    if len(prompt) + max_tokens > budget:
        raise APIError(400, over_budget + f"the prompt's {len(prompt)} tokens plus max_tokens={max_tokens} "
                       f"exceed it (at most {budget - len(prompt)}).", param="max_tokens",
                       code="cache_budget_exceeded")
    return max_tokens


def run_jobs(engine, jobs: list[Job], timeout: float):
    """Submit the jobs to `engine` (429 when the queue is full) and give (choice index, event) from it until
    each is "done", or one gives "error" / "cancelled", or `timeout` seconds are up: (None, ("timeout",)).
    Whatever ends them early, the jobs are cancelled."""
    try:
        for job in jobs:
            engine.submit(job)
    except QueueFull as e:
        for job in jobs:
            engine.cancel(job)
        raise APIError(429, f"The server is busy: {e} (--max-queue). Retry later.", type="rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    deadline = time.monotonic() + timeout
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, job: Job):
        while True:
            event = await job.queue.get()
            merged.put_nowait((i, event))
            if event[0] not in ("text", "prompt"):
                return

    async def stream():
        pumps = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        running = len(jobs)
        try:
            while running:
                try:
                    i, event = await asyncio.wait_for(merged.get(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    i, event = None, ("timeout",)
                yield i, event
                if event[0] == "done":
                    running -= 1
                elif event[0] not in ("text", "prompt"):
                    return
        finally:
            for task in pumps:
                task.cancel()
            for job in jobs:
                engine.cancel(job)  # a no-op once it has finished; frees its row at once if not

    return stream()
