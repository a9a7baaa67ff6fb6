"""Rollouts with the engine `frugallm serve` runs (infer/engine.py: continuous batching, its sampler), and
the log-probs of the same tokens from a training forward.

Each completion is one engine Job at the rollout temperature (no top-k / top-p, no penalties: the ratio
needs the policy's own distribution), with its own seed, a function of (run seed, step, index): with the
jobs submitted together (below) the engine's batches are the same on every run, so a resumed run samples
what the uninterrupted one did. The engine reports each sampled token's log-prob except the end-of-text
token's (a finished job posts none for it); the training forward (`completion_logprobs`) gives all of them.

Shapes: N completions; S = the longest prompt + completion; T = the longest completion.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

import torch

from ..infer.engine import Engine, Job
from .objective import token_logprobs


@dataclass
class Rollout:
    prompt: list[int]  # bos + the prompt's tokens
    tokens: list[int]  # the completion, its end-of-text token included when it wrote one
    sampled_logprobs: list[float]  # the engine's log-prob of each token but a final end-of-text one
    finish: str  # "stop" (end-of-text) or "length"


def seed_for(seed: int, step: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"grpo|{seed}|{step}|{index}".encode()).digest()[:4], "little")


async def _collect(engine: Engine, jobs: list[Job]) -> list[tuple[list, str]]:
    # submitted under the engine's lock, so that its worker admits them together (in order, up to its
    # slots) and the batches do not depend on thread timing
    with engine._wake:
        for job in jobs:
            engine.submit(job)
    out = []
    for job in jobs:
        entries, finish = [], None
        while finish is None:
            event = await job.queue.get()
            if event[0] == "text":
                entries += event[2]
            elif event[0] == "done":
                finish = event[1]
            elif event[0] == "error":
                raise RuntimeError(f"a rollout failed in the engine: {event[1]}")
        out.append((entries, finish))
    return out


def sample(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float, seeds: list[int],
           slots: int = 64) -> list[Rollout]:
    """One completion per prompt (repeat a prompt G times for a group), sampled by a fresh Engine over
    `model` (its own dtype: the training model's fp32 weights), which is closed afterwards."""
    was_training = model.training
    model.eval()
    longest = max(len(p) for p in prompts) + max_new_tokens
    slots = max(1, min(slots, len(prompts)))
    engine = Engine(model, tokenizer, slots=slots, max_cache_tokens=slots * longest, max_queue=len(prompts))
    try:
        jobs = [Job(prompt=list(p), max_tokens=max_new_tokens, temperature=temperature, seed=s, logprobs=0)
                for p, s in zip(prompts, seeds)]
        results = asyncio.run(_collect(engine, jobs))
    finally:
        engine.close()
        model.train(was_training)
    rollouts = []
    for prompt, (entries, finish) in zip(prompts, results):
        tokens = [e[0] for e in entries] + ([tokenizer.eos_id] if finish == "stop" else [])
        rollouts.append(Rollout(list(prompt), tokens, [e[1] for e in entries], finish))
    return rollouts


def batch(rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rollouts as one right-padded forward: ids (N, S) = prompt + completion, at (N, T) = the index
    into S whose logits predict each completion token, tokens (N, T) and mask (N, T)."""
    N = len(rollouts)
    S = max(len(r.prompt) + len(r.tokens) for r in rollouts)
    T = max(max(len(r.tokens) for r in rollouts), 1)
    ids = torch.zeros(N, S, dtype=torch.long)
    at = torch.zeros(N, T, dtype=torch.long)
    tokens = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i, r in enumerate(rollouts):
        P, C = len(r.prompt), len(r.tokens)
        ids[i, :P + C] = torch.tensor(r.prompt + r.tokens)
        at[i] = (P - 1 + torch.arange(T)).clamp_max(S - 1)
        tokens[i, :C] = torch.tensor(r.tokens, dtype=torch.long)
        mask[i, :C] = True
    return ids, at, tokens, mask


def completion_logprobs(forward, ids: torch.Tensor, at: torch.Tensor, tokens: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) (N, T) fp32 from one forward over ids (N, S), logits only where completions are
    predicted (right padding never reaches an earlier position: attention is causal)."""
    logits = forward(ids, logits_at=at).logits  # (N, T, V)
    return token_logprobs(logits, tokens, temperature)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """bos + the prompt's tokens, as `frugallm train --data` reads a prompt/completion record's prompt."""
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)


def completion_text(tokenizer, rollout: Rollout) -> str:
    tokens = rollout.tokens[:-1] if rollout.finish == "stop" else rollout.tokens
    return tokenizer.decode(tokens)
