"""Decode speed against context: a V3-shaped model vs a V4-shaped one of equal width, side by side in one run.

Issue 27, item 5 (docs/design/v4-attention.md). The models share the width, depth and MoE of
bench_dsa_decode.py's V3 shape (dim 384, 4 layers, 16 routed experts); V4 swaps MLA for the hybrid
attention (model/hybrid_attention.py: one shared K = V head of 128 over a 128-token sliding window, plus
CSA 4:1 with the lightning indexer's top-256, or HCA 128:1, by layer: sliding, CSA, HCA, CSA), the
sqrtsoftplus router and the release's mHC (4 streams). A third row runs the V4 model with a plain
residual, so that the attention's cost shows apart from mHC's.

Each figure is one batch-1 decode step (eager, no prepacked or compiled kernels: every row runs the plain
path) at a context of T positions, warm, the median of --steps steps. No cache is prefilled by the model:
V3's holds random latents and rope keys at its T-1 earlier positions (bench_dsa_decode.py), V4's the rows a
HybridCache holds after T-1 tokens (window rows, CSA / HCA entries and indexer keys, the open windows' C, Z
rows and the Ca half), random. V4's compressors pool a window every m-th step, so its timed steps run at
the 4 positions T-4 .. T-1 in turn (a CSA window closes at one of them, the HCA window at T-1), each cache
rewound after its step (HybridCache.truncate). The models take turns step by step, so a load that comes
and goes on a shared host hits all alike. One table per dtype; one torch thread by default.

What V4's reference path does per step (hybrid_attention.py): the indexer scores all T/4 compressed keys,
then the attention scores the window and ALL T/4 CSA entries under the top-k mask (no gathered kernel
yet), so its CSA cost still grows as T/4; V3's absorbed MLA scores all T latents.

    python benchmarks/bench_v4_decode.py [--contexts 1024,4096,16384] [--steps 15] [--dtypes fp32,bf16]
                                         [--threads 1] [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import frugallm
from frugallm.model.hybrid_cache import HybridCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, print_host_header, save_output  # noqa: E402
from bench_dsa_decode import V3_SHAPE, random_cache  # noqa: E402

# V4's attention at this width (V4-Flash: 64 heads of 512, window 128, CSA 4 + top-512, HCA 128, 8 groups)
V4_ATTENTION = dict(attention="hybrid", layer_types=("sliding", "csa", "hca", "csa"), head_dim=128, n_heads=8,
                    q_lora_rank=192, qk_rope_head_dim=32, sliding_window=128, csa_rate=4, hca_rate=128,
                    o_groups=2, o_lora_rank=128, index_topk=256, index_n_heads=8, index_head_dim=64,
                    attn_sink=True, n_expert_groups=1, n_limited_groups=1, score_func="sqrtsoftplus",
                    route_scale=1.5, swiglu_limit=10.0, residual="mhc", hc_form="release", hc_streams=4)
POSITIONS = 4  # V4 steps cycle through T-4 .. T-1: one CSA pooling in four steps, as in a real decode


def configs(max_len: int):
    v3 = frugallm.get_preset("tiny", **V3_SHAPE, max_seq_len=max_len)
    v4 = v3.replace(**V4_ATTENTION)
    return v3, v4, v4.replace(residual="plain", hc_form="paper")


def models(max_len: int, dtype: torch.dtype):
    torch.manual_seed(0)
    v3, v4, v4_plain = configs(max_len)
    return [("V3 (dense MLA)", frugallm.Transformer(v3).eval().to(dtype)),
            ("V4 (hybrid: window + CSA top-256 + HCA, mHC)", frugallm.Transformer(v4).eval().to(dtype)),
            ("V4 attention, plain residual (no mHC)", frugallm.Transformer(v4_plain).eval().to(dtype))]


def random_hybrid_cache(model, L: int, dtype: torch.dtype) -> HybridCache:
    """A rewindable batch-1 HybridCache holding, as random values, what L tokens leave in it."""
    cfg = model.config
    cache, g = HybridCache(cfg, 1, rewindable=True), torch.Generator().manual_seed(L)
    rand = lambda *shape: torch.randn(1, *shape, generator=g).to(dtype)
    for i, kind in enumerate(cfg.layer_types[:cfg.n_layers]):
        layer = cache.layer(i)
        layer.kv = rand(min(L, cfg.sliding_window - 1), cfg.head_dim)
        m = cfg.hca_rate if kind == "hca" else cfg.csa_rate
        for state, width in ((layer.compressed, cfg.head_dim), (layer.index, cfg.index_head_dim)):
            if state is None:
                continue
            overlap, n = kind == "csa", L // m
            state.entries = rand(n, width)
            state.kv, state.gate = rand(L % m, (2 if overlap else 1) * width), rand(L % m, (2 if overlap else 1) * width)
            state.prior = (rand(m, width), rand(m, width)) if overlap and n else None
            state.count = n
    cache.length = L
    cache.lengths.fill_(L)
    return cache


@torch.inference_mode()
def step(model, cache) -> float:
    """Seconds of one decode step at the cache's next position; the cache is left as it was."""
    if isinstance(cache, HybridCache):
        t0 = time.perf_counter()
        model(torch.tensor([[7]]), cache=cache)
        seconds = time.perf_counter() - t0
        cache.truncate(cache.length - 1)
        return seconds
    cache.lengths.fill_(cache.max_len - 1)
    t0 = time.perf_counter()
    model(torch.tensor([[7]]), cache=cache, absorb=True)
    return time.perf_counter() - t0


def table(rows, contexts: list[int], steps: int, dtype: torch.dtype, label: str) -> None:
    results = {name: {} for name, _ in rows}
    for T in contexts:
        caches = {name: ([random_hybrid_cache(m, T - POSITIONS + j, dtype) for j in range(POSITIONS)]
                         if m.config.attention == "hybrid" else [random_cache(m, T, dtype)]) for name, m in rows}
        times = {name: [] for name, _ in rows}
        for i in range(steps + 2):
            for name, model in rows:
                seconds = step(model, caches[name][i % len(caches[name])])
                if i >= 2:
                    times[name].append(seconds)
        for name in times:
            results[name][T] = statistics.median(times[name])
        del caches
    print(f"| {label} | " + " | ".join(f"T={T:,}: ms, tok/s" for T in contexts)
          + f" | T={contexts[-1]:,} / T={contexts[0]:,} |")
    print("|" + "---|" * (len(contexts) + 2))
    for name, by_T in results.items():
        cells = " | ".join(f"{by_T[T] * 1e3:.2f}, {1 / by_T[T]:,.1f}" for T in contexts)
        print(f"| {name} | {cells} | {by_T[contexts[-1]] / by_T[contexts[0]]:.2f}x |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="1024,4096,16384", help="context lengths T (default 1k, 4k, 16k)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per model and context, median (default 15)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="one table per dtype (default fp32,bf16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_host_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    save_output("bench_v4_decode", args.save)
    print_host_header()
    contexts = [int(c) for c in args.contexts.split(",")]
    v3, v4, _ = configs(max(contexts))
    counts = [frugallm.count_params(c) for c in (v3, v4)]
    print(f"batch 1, eager decode; dim {v3.dim}, {v3.n_layers} layers, {v3.n_routed_experts} routed experts; "
          f"V3: MLA {v3.n_heads} heads, kv_lora_rank {v3.kv_lora_rank}, rope {v3.qk_rope_head_dim}; V4: "
          f"{v4.n_heads} heads over one K=V head of {v4.head_dim}, window {v4.sliding_window}, layers "
          f"{'/'.join(v4.layer_types)}, CSA 1/{v4.csa_rate} top-{v4.index_topk}, HCA 1/{v4.hca_rate}, mHC x{v4.hc_streams}")
    print(f"parameters (main model): V3 {counts[0]['total'] / 1e6:.2f}M ({counts[0]['active'] / 1e6:.2f}M active), "
          f"V4 {counts[1]['total'] / 1e6:.2f}M ({counts[1]['active'] / 1e6:.2f}M active)")
    print(f"caches filled with random values (no prefill); median of {args.steps} steps, the models taking turns\n")
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        table(models(max(contexts), dtype), contexts, args.steps, dtype, name)


if __name__ == "__main__":
    main()
