"""Report sections that time code paths rather than train: a pipeline stage's F, B and W on this host (fed
to the DualPipeV simulator), V3.2's sparse decode step against dense MLA's, and GRPO (docs/report.md)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .core import Finding, Section
from .plots import bar_chart, timeline

# V3's shape at a small width (benchmarks/bench_dsa_decode.py): MLA with q and kv latents, 8 heads, 1 dense + 3 MoE
DSA_SHAPE = dict(vocab_size=4096, dim=384, n_layers=4, n_dense_layers=1, inter_dim=1024, n_heads=8, q_lora_rank=192,
                 kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
                 n_shared_experts=1, n_activated_experts=4, moe_inter_dim=192, n_expert_groups=4, n_limited_groups=2,
                 n_mtp=0)


def stage_durations(scale: str = "mini", rounds: int = 3) -> tuple[float, float, float]:
    """(F, B, W) in ms for the report's model as one pipeline stage: the forward with its loss, the backward to
    the stage's input only (autograd.grad: no weight gradients), and the weight gradients (a full backward
    less B). Medians of `rounds`."""
    from ..model.transformer import Transformer
    from .harness import SCALES, config, stdlib_bytes, windows

    torch.manual_seed(0)
    model = Transformer(config(scale)).train()
    train, _ = stdlib_bytes()
    _, batch, seq = SCALES[scale]
    x, y = windows(train, torch.arange(batch) * 4099, seq)
    held = {}
    model.embed.register_forward_hook(lambda m, a, out: held.setdefault("h", out.detach().requires_grad_()))
    f, b, full = [], [], []
    for _ in range(rounds + 1):
        held.clear()
        t0 = time.perf_counter()
        loss = model(x, targets=y).loss
        t1 = time.perf_counter()
        torch.autograd.grad(loss, held["h"], retain_graph=True)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        f.append(t1 - t0), b.append(t2 - t1), full.append(t3 - t2)
    med = lambda v: 1e3 * statistics.median(v[1:])
    return med(f), med(b), max(0.0, med(full) - med(b))


def dualpipe_measured(out: Path) -> tuple[list[list], str, dict]:
    """Rows (pp, simulated bubble, Table 2, share of the span) at this host's F, B, W; a timeline plot."""
    from ..parallel.schedule import Durations, min_chunks, run, table2

    f, b, w = stage_durations()
    d = Durations(f, b, w)  # F&B = F + B + W: one CPU overlaps nothing
    rows, res4 = [], None
    for pp in (2, 4):
        res = run("dualpipev", pp, max(min_chunks("dualpipev", pp), 2 * pp), d)
        sim, t2 = max(res.bubble), table2("dualpipev", pp, d)["bubble"]
        rows.append([pp, f"measured F={f:.0f} B={b:.0f} W={w:.0f} ms", sim, t2,
                     f"{sim / res.makespan:.1%} of the span"])
        res4 = res if pp == 4 else res4
    plot = timeline(out / "plots" / "pipeline_timeline.png", res4,
                    f"DualPipeV, pp 4, {res4.chunks} micro-batches, at the F/B/W measured here (simulated)")
    return rows, plot, {"f_ms": f, "b_ms": b, "w_ms": w}


def dsa_models(topk: int, max_len: int):
    """V3-shaped dense MLA and V3.2-shaped DSA (the same weights plus indexers), eval, fp32."""
    from ..config import get_preset
    from ..model.transformer import Transformer

    v3 = get_preset("tiny", **DSA_SHAPE, max_seq_len=max_len)
    torch.manual_seed(0)
    dense = Transformer(v3).eval()
    sparse = Transformer(v3.replace(index_topk=topk, index_n_heads=8, index_head_dim=64)).eval()
    sparse.load_state_dict(dense.state_dict(), strict=False)  # the indexers keep their own init
    return dense, sparse


def random_cache(model, T: int):
    """A batch-1 cache of T slots whose first T-1 positions hold random values (a decode step's work does not
    depend on what the earlier positions hold; a 16k prefill would take minutes)."""
    from ..model.kv_cache import KVCache

    cache = KVCache(model.config, 1, T, dtype=torch.float32)
    g = torch.Generator().manual_seed(T)
    for buffers in cache.buffers():
        for buf in buffers:
            buf.copy_(torch.randn(buf.shape, generator=g))
    return cache


@torch.inference_mode()
def decode_step(model, cache) -> float:
    """Seconds of one absorbed decode step at the cache's last position."""
    cache.lengths.fill_(cache.max_len - 1)
    t0 = time.perf_counter()
    model(torch.tensor([[7]]), cache=cache, absorb=True)
    return time.perf_counter() - t0


def dsa_decode(share: float, out: Path) -> Finding:
    contexts, start = [1024, 4096, 16384, 32768], time.monotonic()
    topk, steps = 256, 5
    rows, timed = [], []
    for T in contexts:
        spent = time.monotonic() - start
        if timed and spent + (spent / sum(timed)) * T * 1.3 > share:  # the next context's cost grows ~ with T
            break
        dense, sparse = dsa_models(topk, T)
        caches = (random_cache(dense, T), random_cache(sparse, T))
        times = ([], [])
        for _ in range(steps + 1):  # taking turns: a load that comes and goes hits both alike
            for i, m in enumerate((dense, sparse)):
                times[i].append(decode_step(m, caches[i]))
        d_ms, s_ms = (1e3 * statistics.median(t[1:]) for t in times)
        rows.append([T, d_ms, s_ms, d_ms / s_ms])
        timed.append(T)
    if len(rows) < 2:
        return Finding(measured=f"not measured, because the share ({share:.0f} s) fitted one context only",
                       verdict="not measurable at this scale", why="a cost against context needs two contexts",
                       setup="", figures={"speedup_longest": "not measured, because one context fitted"})
    growth_d, growth_s = rows[-1][1] / rows[0][1], rows[-1][2] / rows[0][2]
    ok = rows[-1][3] > 1 and growth_s < growth_d
    plot = bar_chart(out / "plots" / "dsa_decode.png", [f"T = {r[0]:,}" for r in rows], [r[1] for r in rows],
                     "ms per decode step (batch 1, fp32)", "dense MLA (V3) vs DSA top-256 (V3.2)",
                     second=[r[2] for r in rows], labels=("V3 dense", "V3.2 sparse"))
    return Finding(
        measured=f"at T = {rows[-1][0]:,} a sparse step is {rows[-1][3]:.2f}x faster; from T = {rows[0][0]:,} "
                 f"dense grows {growth_d:.2f}x, sparse {growth_s:.2f}x",
        verdict="reproduced" if ok else "not reproduced",
        why=(f"past the indexer's O(T) scan, attention reads top-{topk} rows whatever T, so its cost "
             f"{'grows less than' if growth_s < growth_d else 'does not grow less than'} dense MLA's; at "
             f"T = {rows[0][0]:,} the indexer costs more than it saves (T / k = {rows[0][0] // topk})"),
        setup=f"one batch-1 absorbed decode step, eager fp32, median of {steps}, cache filled with random values; "
              f"dim 384, 4 layers, 8 heads, kv_lora_rank 256; V3.2 adds 8 indexer heads of 64, top-{topk}",
        scale=f"contexts {', '.join(f'{r[0]:,}' for r in rows)} fitted the share",
        figures={"speedup_longest": rows[-1][3], "growth_dense": growth_d, "growth_sparse": growth_s},
        header=["context T", "dense ms", "sparse ms", "sparse speed-up"], rows=rows, plots=[plot])


def grpo(share: float, out: Path) -> Finding:
    why = ("GRPO's gain is measured on a task a base model already solves sometimes (R1-Zero starts at 15.6 % "
           "AIME pass@1); a byte model trained for a few minutes solves none of frugallm's built-in tasks "
           "(rl/tasks.py), so every sample of a group earns the same reward, every advantage is 0 and GRPO has "
           "nothing to learn from")
    return Finding(
        measured="not measured, because " + why.split("; ")[1],
        verdict="not measurable at this scale", why=why,
        setup="measured apart: `frugallm grpo --init-from RUN --task arithmetic` on a run that can do arithmetic "
              "(docs/design/grpo.md)",
        figures={"reward_gain": "not measured, because no model trained within the budget earns a reward"})


SECTIONS = [
    Section("dsa_decode", "V3.2's sparse decode against dense",
            "DeepSeek-V3.2 (arXiv 2512.02556) §2.1 and Fig. 3: DSA's decode cost per token stays nearly flat with "
            "the context while MLA's grows", dsa_decode, weight=1),
    Section("grpo", "GRPO's gain",
            "DeepSeek-R1 (arXiv 2501.12948) §2.2 and Table 2: RL with GRPO alone raises R1-Zero's AIME 2024 pass@1 "
            "from 15.6 % to 71.0 %", grpo, weight=0),
]
