"""Generation on a terminal: a prompt's continuation streamed as it decodes, then one line of speeds
(`frugallm generate`), and the sample a training run prints at its end (`frugallm train`)."""

from __future__ import annotations

import sys
import time

import torch

from .generate import generate, generate_stream


def stream_completion(model, tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                      speculative: bool = False, decoder=None, out=None) -> str:
    """Write `prompt` and its continuation to `out` (default stdout), flushed token by token, and
    return the speeds line: tokens/s over the whole call, time to the first token (the prefill),
    decode tokens/s, and with `speculative` the MTP drafts' acceptance and tokens per forward."""
    out = out or sys.stdout
    tok = tokenizer
    ids = [tok.bos_id, *tok.encode(prompt)] if tok.bos_id is not None else tok.encode(prompt)
    stats, text, t0 = {}, tok.stream(), time.perf_counter()
    print(prompt, end="", flush=True, file=out)
    for step in generate_stream(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop=tok.eos_id, speculative=speculative, stats=stats, decoder=decoder):
        print(text.push(step[0].tolist()), end="", flush=True, file=out)
    print(text.flush(), file=out)
    wall = time.perf_counter() - t0
    line = (f"[{stats['new_tokens']} tokens in {wall:.2f} s: {stats['new_tokens'] / wall:.1f} tokens/s; "
            f"first token after {stats['prefill_s'] * 1e3:.0f} ms ({stats['prompt_tokens']}-token prompt)")
    if stats.get("decode_s") and stats["new_tokens"] > 1:
        line += f", decode {(stats['new_tokens'] - 1) / stats['decode_s']:.1f} tokens/s"
    if speculative:
        line += (f"; speculative: acceptance {stats['acceptance']:.2f}, "
                 f"{stats['tokens_per_forward']:.2f} tokens per forward")
    return line + "]"


def print_sample(run, prompt: str, n_tokens: int) -> None:
    """Print up to `n_tokens` sampled after `prompt` by the model in `run` (temperature 0.8, top-k 40,
    seed 0: the same text for the same weights), between two rules."""
    from ..formats.checkpoint import load_tokenizer
    from ..plan import load

    model, tok = load(run), load_tokenizer(run)
    ids = torch.tensor([[tok.bos_id, *tok.encode(prompt)]])
    n_tokens = min(n_tokens, model.config.max_seq_len - ids.shape[1])
    new = generate(model, ids, n_tokens, temperature=0.8, top_k=40, seed=0, stop=tok.eos_id)
    print(f"--- sample ({n_tokens} tokens max, temperature 0.8, top-k 40) ---")
    print(prompt + tok.decode(new[0].tolist()))
    print("---")
