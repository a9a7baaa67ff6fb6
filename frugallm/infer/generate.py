"""Autoregressive generation over the latent KV cache.

Prefill runs the prompts (right-padded to a common length) through the naive MLA path; then every
step feeds the last verified token (plus, with `speculative`, the MTP drafts) through the
absorbed path. Rows keep their own lengths in the cache, so prompts of different lengths batch
together and each row's positions are exactly those of running it alone. V4's hybrid attention decodes
over its HybridCache instead, one batch per prompt length (caches.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from .caches import by_length, hybrid_decode, new_cache, set_lengths
from .sampling import check_sampling, sample
from .speculative import Drafter, accept


@torch.inference_mode()
def generate_stream(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, stop: int | Sequence[int] | None = None,
                    speculative: bool = False, stats: dict | None = None, decoder=None) -> Iterator[torch.Tensor]:
    """Yield the new tokens of every model step as (B, k) int64, k >= 1 (k > 1 only with `speculative`).

    input_ids: a (B, T) tensor, or a list of B token-id lists of any lengths.
    stop: token id(s) that end a row; a row that stopped yields its first stop id as padding. The
        stream ends when every row stopped or after max_new_tokens tokens.
    speculative: draft with the model's MTP modules and verify in one forward (speculative.py).
    stats: a dict to fill with counters: prompt_tokens, new_tokens, forwards, drafted, accepted,
        acceptance, tokens_per_forward, prefill_s (time to first token) and decode_s.
    decoder: runs the decode / verify forwards (`decoder(ids, cache)`) and the MTP drafts
        (`decoder.mtp_step`) instead of the eager model: a compiled step, kernels/compiled.py
        compile_decode(model). Prefill stays eager.
    Closing the generator early releases its cache.
    """
    cfg = model.config
    device = model.embed.weight.device
    prompts = _prompts(input_ids, cfg.vocab_size)
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be > 0")
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    B, longest = len(prompts), int(lengths.max())
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                         f"{cfg.max_seq_len} tokens; shorten the prompt or ask for fewer tokens")
    if speculative and cfg.n_mtp == 0:
        raise ValueError("speculative decoding drafts with the model's MTP modules, and this model has none (n_mtp=0)")
    if hybrid_decode(model, decoder) and len(set(map(len, prompts))) > 1:  # one HybridCache length per batch (caches.py)
        again = lambda group, part: generate_stream(model, group, max_new_tokens, temperature, top_k, top_p, seed,
                                                    stop, speculative, part, decoder)
        yield from by_length(prompts, again, stats, stop if isinstance(stop, int) else (list(stop or []) or [None])[0])
        return
    D = cfg.n_mtp if speculative else 0
    stops = torch.tensor([stop] if isinstance(stop, int) else list(stop or []), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    dtype = model.embed.weight.dtype
    size = longest + max_new_tokens  # positions ever written: < longest + max_new_tokens - 1
    seq = torch.zeros(B, size + D + 1, dtype=torch.long, device=device)  # verified tokens, then drafts
    for b, p in enumerate(prompts):
        seq[b, : len(p)] = torch.as_tensor(p)
    counters = dict(prompt_tokens=int(lengths.sum()), new_tokens=0, forwards=0, drafted=0, accepted=0)
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        cache = new_cache(model, B, size, rewindable=bool(D))
        out = model(seq[:, :longest], cache=cache, logits_at=(lengths - 1)[:, None])
        set_lengths(cache, lengths)  # padding slots past each prompt are stale from here on
        drafter = Drafter(model, B, size + D + 1, dtype, device, decoder and decoder.mtp_step) if D else None
        if drafter:
            drafter.record(torch.arange(longest, device=device).expand(B, -1), out.hidden)
        token = sample(out.logits[:, 0], temperature, top_k, top_p, generator)
        seq[torch.arange(B), lengths] = token
        n_verified, made = lengths + 1, 1  # tokens in seq; new tokens per row
        done = torch.zeros(B, dtype=torch.bool, device=device)
        pad = stops[0] if len(stops) else None
        counters["prefill_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        yield _finish(token[:, None], done, stops, pad)
        while not D and made < max_new_tokens and (pad is None or not done.all()):
            # No drafts: the general loop below with n = 0, minus its bookkeeping (positions, the gather,
            # seq, set_lengths: the step advances the cache itself), ~0.1 ms a token on the tiny preset
            out = decoder(token[:, None], cache) if decoder else model(token[:, None], cache=cache, absorb=True)
            token = sample(out.logits[:, -1], temperature, top_k, top_p, generator)
            made += 1
            counters["forwards"] += 1
            yield _finish(token[:, None], done, stops, pad)
        while D and made < max_new_tokens and not done.all():
            n_drafts = min(D, max_new_tokens - made - 1)
            drafts, dists = (drafter.draft(seq, n_verified, n_drafts, temperature, top_k, top_p, generator)
                             if n_drafts else (seq[:, :0], None))
            positions = (n_verified - 1)[:, None] + torch.arange(n_drafts + 1, device=device)  # (B, n_drafts+1)
            ids = seq.gather(1, positions)
            out = decoder(ids, cache) if decoder else model(ids, cache=cache, absorb=True)
            n, token, row_accepted = accept(out.logits, drafts, dists, temperature, top_k, top_p, generator)
            if drafter:
                drafter.record(positions, out.hidden)
            set_lengths(cache, n_verified + n)  # keep [last verified, d_1..d_n]; the rest is stale
            seq[torch.arange(B), n_verified + n] = token
            new = torch.cat([drafts[:, :n], token[:, None]], dim=1)
            n_verified, made = n_verified + n + 1, made + n + 1
            counters["forwards"] += 1
            counters["drafted"] += B * n_drafts
            counters["accepted"] += int(row_accepted.sum())
            yield _finish(new, done, stops, pad)
        counters["decode_s"] = time.perf_counter() - t1
        counters["new_tokens"] = B * made
    finally:
        model.train(was_training)
        if stats is not None:
            stats.update(counters)
            stats["acceptance"] = counters["accepted"] / max(counters["drafted"], 1) if D else None
            stats["tokens_per_forward"] = (counters["new_tokens"] / B - 1) / max(counters["forwards"], 1)


def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop: int | Sequence[int] | None = None,
             speculative: bool = False, stats: dict | None = None, decoder=None) -> torch.Tensor:
    """New token ids (B, T_new), T_new <= max_new_tokens: shorter when every row hit `stop` early,
    and rows that stopped before the others are padded with their stop id. See `generate_stream`."""
    steps = generate_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop, speculative,
                            stats, decoder)
    return torch.cat(list(steps), dim=1)[:, :max_new_tokens]


def _finish(new: torch.Tensor, done: torch.Tensor, stops: torch.Tensor, pad) -> torch.Tensor:
    """Pad rows from their first stop token on, and mark them done (in place)."""
    if pad is None:
        return new
    hit = torch.isin(new, stops)
    after = (hit.long().cumsum(dim=1) - hit.long()) > 0  # strictly after the row's first stop in `new`
    new = new.masked_fill(done[:, None] | after, int(pad))
    done |= hit.any(dim=1)
    return new


def _prompts(input_ids, vocab_size: int) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"input_ids must be (batch, seq) integer token ids, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        prompts = input_ids.tolist()
    else:
        prompts = [list(p) for p in input_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's bos id)")
    bad = [t for p in prompts for t in p if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
    return prompts
