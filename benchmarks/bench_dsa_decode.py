"""Decode speed against context: a V3-shaped model vs a V3.2-shaped one (DSA), side by side in one run.

Issue 26, item 3 (docs/design/dsa.md). The two models share one ModelConfig but for the index_* fields:
V3.2 adds a lightning indexer per layer (model/indexer.py), and its absorbed decode step gathers only
the index_topk latent rows each query kept (model/attention.py MLA._over_rows), so past the indexer's
O(T) scan its attention stops growing with the context T. A third row runs the V3.2 model through its
masked twin (the same keys, attended over all T rows under the top-k mask: GATHER_RATIO 0), so the gain
of gathering shows apart from the indexer's own cost.

Each figure is one batch-1 decode step (absorbed MLA, eager, no prepacked or compiled kernels: all
three rows run the same plain path) at a context of T positions, warm, the median of --steps steps.
The cache is not prefilled by the model: its T-1 earlier positions hold random latents, rope keys and
indexer keys (a 16k prefill would take minutes and does not change a decode step's work), and each
timed step writes position T-1 and attends over all T. The three models (V3, V3.2, V3.2 masked) take
turns step by step, so a load that comes and goes on a shared host hits all three alike. One table per
dtype: fp32, and bf16 (the inference choice of hosts with native bf16). One torch thread by default:
on a shared 2-core machine, two threads stall on another job's work.

    python benchmarks/bench_dsa_decode.py [--contexts 1024,4096,16384] [--topk 256] [--steps 15]
                                          [--dtypes fp32,bf16] [--threads 1] [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import frugallm
from frugallm.model import attention
from frugallm.model.kv_cache import KVCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, print_host_header, save_output  # noqa: E402

# V3's shape at a small width: MLA with q and kv latents, 8 heads, 1 dense + 3 MoE layers, no MTP
V3_SHAPE = dict(vocab_size=4096, dim=384, n_layers=4, n_dense_layers=1, inter_dim=1024, n_heads=8,
                q_lora_rank=192, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, moe_inter_dim=192,
                n_expert_groups=4, n_limited_groups=2, n_mtp=0)


def configs(topk: int, max_len: int):
    """The V3-shaped config and the V3.2-shaped one: the same but for the index_* fields."""
    v3 = frugallm.get_preset("tiny", **V3_SHAPE, max_seq_len=max_len)
    return v3, v3.replace(index_topk=topk, index_n_heads=8, index_head_dim=64)


def models(topk: int, max_len: int, dtype: torch.dtype):
    """(name, model, gather) rows: V3, V3.2 (its indexer added to the same weights), V3.2's masked twin."""
    v3, v32 = configs(topk, max_len)
    torch.manual_seed(0)
    dense = frugallm.Transformer(v3).eval()
    sparse = frugallm.Transformer(v32).eval()
    sparse.load_state_dict(dense.state_dict(), strict=False)  # the indexers keep their own init
    dense, sparse = dense.to(dtype), sparse.to(dtype)
    return [("V3 (dense MLA)", dense, True), (f"V3.2 (DSA top-{topk}, gathered)", sparse, True),
            ("V3.2 masked twin (all T rows)", sparse, False)]


def random_cache(model, T: int, dtype: torch.dtype) -> KVCache:
    """A batch-1 cache of T slots whose first T-1 positions hold random (norm-like) values."""
    cache = KVCache(model.config, 1, T, dtype=dtype)
    g = torch.Generator().manual_seed(T)
    for buffers in cache.buffers():
        for b in buffers:
            b.copy_(torch.randn(b.shape, generator=g))
    cache.lengths.fill_(T - 1)
    return cache


@torch.inference_mode()
def step(model, cache: KVCache, gather: bool) -> float:
    """Seconds of one decode step at position T-1."""
    attention.GATHER_RATIO = 4 if gather else 0  # 0: S * k > 0 always, so the absorbed path stays masked
    cache.lengths.fill_(cache.max_len - 1)
    t0 = time.perf_counter()
    model(torch.tensor([[7]]), cache=cache, absorb=True)
    seconds = time.perf_counter() - t0
    attention.GATHER_RATIO = 4
    return seconds


def table(rows, contexts: list[int], steps: int, dtype: torch.dtype, label: str) -> None:
    """Time every row at every context (2 warm-up steps, then `steps` in turns) and print the table."""
    results = {name: {} for name, _, _ in rows}
    for T in contexts:
        caches = {id(m): random_cache(m, T, dtype) for _, m, _ in rows}
        times = {name: [] for name, _, _ in rows}
        for i in range(steps + 2):
            for name, model, gather in rows:
                seconds = step(model, caches[id(model)], gather)
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
    parser.add_argument("--topk", type=int, default=256, help="V3.2's index_topk (default 256)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per model and context, median (default 15)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="one table per dtype (default fp32,bf16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_host_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    save_output("bench_dsa_decode", args.save)
    print_host_header()
    contexts = [int(c) for c in args.contexts.split(",")]
    cfg = configs(args.topk, max(contexts))[1]
    print(f"batch 1, eager absorbed decode; dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"kv_lora_rank {cfg.kv_lora_rank}, rope {cfg.qk_rope_head_dim}; V3.2 the same + index_topk "
          f"{cfg.index_topk}, {cfg.index_n_heads} indexer heads of {cfg.index_head_dim}")
    print(f"cache filled with random latents / keys (no prefill); median of {args.steps} steps, the three "
          "models taking turns step by step\n")
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        table(models(args.topk, max(contexts), dtype), contexts, args.steps, dtype, name)


if __name__ == "__main__":
    main()
