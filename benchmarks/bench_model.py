"""frugallm vs Hugging Face transformers on identical weights, on the CPU.

What it measures, for the `tiny` preset with n_mtp=0 (transformers has no MTP):
  * train step: forward + loss + backward, tokens/s (frugallm's loss includes its small balance loss);
  * prefill: one forward under torch.inference_mode (transformers with use_cache=False, since
    frugallm without a cache writes none either), tokens/s;
  * frugallm under torch.compile as well (the fast path; --no-compile skips it);
  * a matmul roofline: FLOPs of a step (2 x active matmul params x tokens + causal attention
    scores/values; backward = 2 x forward) over a measured torch.mm rate = the ideal time, and
    measured / ideal per side;
  * frugallm's grouped vs loop routed experts (kernels/experts.py, swapped in place).

Both models hold the same weights: frugallm writes a HF checkpoint (to_hf, with a non-zero
e_score_correction_bias), transformers and frugallm (from_hf) both load it, and their fp32 logits
and losses are checked to agree before anything is timed. Runs are alternated between the sides
in one process (after a warm-up) and the median per side is reported, so drifting machine load
hits both sides alike.

Dtype: both sides run in the same dtype, the host's best (frugallm/host.py `choose_dtype`: "train"
for the train step, "prefill" for prefill; bf16 only where it measures clearly faster than fp32 on
this CPU) unless --dtype forces one; each row prints the dtype it ran in.

    python benchmarks/bench_model.py [--batch 8] [--seq 256] [--rounds 15] [--dtype auto|fp32|bf16]
                                     [--compile|--no-compile] [--profile] [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import frugallm
from frugallm.kernels.experts import GroupedExperts, use_grouped_experts
from frugallm.model.moe import MoE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, dtype_name, pick_dtype, print_host_header, save_output  # noqa: E402

CPU_EXPERT_IMPLS = ("eager", "grouped_mm", "batched_mm")  # the others (deepgemm, sonicmoe) are GPU kernels


# --- models ---------------------------------------------------------------------------------

def write_checkpoint(path: Path, seq: int) -> Path:
    """A random tiny DeepSeek-V3 (no MTP) with a non-zero selection bias, as a HF directory."""
    torch.manual_seed(0)
    model = frugallm.Transformer(frugallm.get_preset("tiny", n_mtp=0, max_seq_len=max(512, seq)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.bias.normal_(std=0.01)  # on the scale of the score spread: routing stays token-dependent
    return frugallm.to_hf(model, path, dtype=torch.float32)


def load_hf(path: Path, dtype: torch.dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """frugallm takes targets already shifted; transformers shifts `labels=ids` itself."""
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    return targets


def check_same_model(path: Path, ids: torch.Tensor) -> tuple[float, float]:
    """fp32 logits and loss of frugallm and transformers on the same checkpoint; asserts agreement."""
    fl, hf = frugallm.from_hf(path).eval(), load_hf(path, torch.float32).eval()
    with torch.inference_mode():
        ours = fl(ids, targets=next_token_targets(ids))  # eval mode: loss = lm loss, no balance term
        theirs = hf(input_ids=ids, labels=ids, use_cache=False)
    logit_err = ((ours.logits - theirs.logits).abs().max() / theirs.logits.abs().max()).item()
    loss_err = abs(ours.loss.item() - theirs.loss.item()) / theirs.loss.item()
    assert logit_err < 1e-4, f"frugallm and transformers logits differ: relative max error {logit_err:.2e}"
    assert loss_err < 1e-4, f"frugallm and transformers losses differ: relative error {loss_err:.2e}"
    return logit_err, loss_err


def set_moe_impl(model, impl: str) -> None:
    """The routed experts as the plan runs them ('grouped', kernels/experts.py) or model/moe.py's
    reference loop ('loop'), swapped in place over the same parameters (only when they differ: a
    swap gives dynamo new modules to guard on)."""
    grouped = impl == "grouped"
    if any(isinstance(m, GroupedExperts) for m in model.modules()) != grouped:
        use_grouped_experts(model, grouped)


# --- steps ----------------------------------------------------------------------------------

def frugallm_train(model, ids, targets, moe_impl="grouped"):
    def step():
        set_moe_impl(model, moe_impl)
        model.zero_grad(set_to_none=True)
        model(ids, targets=targets).loss.backward()
    return step


def frugallm_prefill(model, ids, moe_impl="grouped"):
    def step():
        set_moe_impl(model, moe_impl)
        with torch.inference_mode():
            model(ids)
    return step


def hf_train(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
    return step


def hf_prefill(model, ids):
    def step():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    return step


# --- timing ---------------------------------------------------------------------------------

def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(steps: dict, warmup: int, rounds: int) -> dict[str, float]:
    """Warm every step up, then run them in turn `rounds` times: median seconds per step."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def first_call(name: str, fn) -> bool:
    """Run fn once (e.g. to trigger torch.compile); print the time, or the error and return False."""
    try:
        print(f"{name}: first call {seconds(fn):.1f} s")
        return True
    except Exception as e:  # a compile failure must not stop the rest of the benchmark
        print(f"{name} FAILED, left out: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
        return False


def pick_experts_impl(hf, ids) -> tuple[str, dict[str, float]]:
    """Time a prefill with each CPU experts implementation transformers offers (alternated); keep the fastest."""
    def prefill_with(impl):
        def step():
            hf.set_experts_implementation(impl)
            hf_prefill(hf, ids)()
        return step

    impls = [impl for impl in CPU_EXPERT_IMPLS if impl == "eager" or impl in ALL_EXPERTS_FUNCTIONS]
    probe = alternate({impl: prefill_with(impl) for impl in impls}, warmup=1, rounds=3)
    best = min(probe, key=probe.get)
    hf.set_experts_implementation(best)
    return best, probe


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best FLOP/s of an n x n x n torch.mm in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    return 2 * n**3 / min(seconds(lambda: a @ b) for _ in range(reps))


def forward_flops(model, batch: int, seq: int) -> tuple[float, int]:
    """(matmul FLOPs of one forward, active matmul params per token): 2 x (weights a token multiplies
    by) x tokens, plus attention scores and values over the causal triangle (the embedding lookup is
    not a matmul)."""
    cfg = model.config
    active = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name == "embed.weight":
            continue
        # stacked routed experts (E, out, in): each token visits K of the E
        active += p.numel() * cfg.n_activated_experts // cfg.n_routed_experts if p.dim() == 3 else p.numel()
    pairs = seq * (seq + 1) // 2  # (query, key) pairs a causal head scores
    attention = 2 * batch * cfg.n_heads * pairs * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.n_layers
    return 2 * active * batch * seq + attention, active


def profile_train_step(step) -> None:
    from torch.profiler import ProfilerActivity, profile
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# --- main -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15, help="timed runs per side, alternated (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    add_host_args(ap, dtype_help="dtype of both sides (auto: the host profile's train / prefill choice)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time torch.compile(frugallm): the train step (forward + loss + backward through "
                         "inductor) and prefill (default on; --no-compile skips it, compiling takes ~30 s a case)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one frugallm train step")
    args = ap.parse_args()

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    save_output("bench_model", args.save)
    print_host_header()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    choice = {case: pick_dtype(case, args.dtype) for case in ("train", "prefill")}
    for c in choice.values():
        print(c.reason)
    dtype_of = {case: c.dtype for case, c in choice.items()}
    name_of = {case: c.name for case, c in choice.items()}
    tokens = args.batch * args.seq

    pairs = {}  # dtype -> (frugallm, transformers), both cast from the same fp32 checkpoint on load
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "hf", args.seq)
        for dtype in dict.fromkeys(dtype_of.values()):
            # both keep the selection bias fp32
            pairs[dtype] = frugallm.from_hf(path, dtype=dtype), load_hf(path, dtype)
            set_moe_impl(pairs[dtype][0], "grouped")  # as every execution plan runs them (plan.py)
        vocab = next(iter(pairs.values()))[0].config.vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
        logit_err, loss_err = check_same_model(path, ids[:2, :128])

    print(f"\nfrugallm {frugallm.__version__} vs transformers {transformers.__version__} | torch {torch.__version__}, "
          f"{threads} threads | train step {name_of['train']}, prefill {name_of['prefill']} (both sides) | tiny "
          f"preset, n_mtp=0 | batch {args.batch} x {args.seq} = {tokens} tokens")
    print(f"same weights: fp32 logits relative max error {logit_err:.1e}, loss relative error {loss_err:.1e}")
    compiled = {}
    for dtype, (fl, hf) in pairs.items():
        default_impl = hf.config._experts_implementation
        fl.eval()
        hf.eval()
        impl, probe = pick_experts_impl(hf, ids)
        print(f"transformers {dtype_name(dtype)}: attention sdpa, experts_implementation={impl!r} "
              f"(default {default_impl!r}; prefill probe: "
              + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in probe.items()) + ")")
        compiled[dtype] = torch.compile(fl) if args.compile else None

    targets = next_token_targets(ids)
    results = {}
    for case, train in (("train", True), ("prefill", False)):
        fl, hf = pairs[dtype_of[case]]
        cfl = compiled[dtype_of[case]]
        for m in (fl, hf):
            m.train(train)
        if train:
            steps = {"frugallm": frugallm_train(fl, ids, targets), "transformers": hf_train(hf, ids),
                     "frugallm loop": frugallm_train(fl, ids, targets, moe_impl="loop")}
        else:
            steps = {"frugallm": frugallm_prefill(fl, ids), "transformers": hf_prefill(hf, ids),
                     "frugallm loop": frugallm_prefill(fl, ids, moe_impl="loop")}
        if cfl is not None:
            step = frugallm_train(cfl, ids, targets) if train else frugallm_prefill(cfl, ids)
            if first_call(f"torch.compile(frugallm) {case} ({name_of[case]})", step):
                steps["frugallm compiled"] = step
        results[case] = alternate(steps, args.warmup, args.rounds)
        set_moe_impl(fl, "grouped")

    # --- the table
    rows = [("train step (fwd+loss+bwd)", "train", "frugallm"),
            ("prefill (fwd, inference_mode)", "prefill", "frugallm")]
    if args.compile:
        rows.insert(1, ("train step, frugallm compiled", "train", "frugallm compiled"))
        rows.append(("prefill, frugallm compiled", "prefill", "frugallm compiled"))
    header = (f"{'case':<31}| {'dtype':<5} | {'frugallm tok/s':>15} | {'transformers tok/s':>18} | "
              f"{'frugallm/transformers':>21}")
    print("\n" + header + "\n" + "-" * len(header))
    for label, case, side in rows:
        t = results[case]
        if side not in t:
            print(f"{label:<31}| {name_of[case]:<5} | {'failed':>15} |")
            continue
        ours, theirs = tokens / t[side], tokens / t["transformers"]
        print(f"{label:<31}| {name_of[case]:<5} | {ours:>15,.0f} | {theirs:>18,.0f} | {ours / theirs:>21.2f}")

    # --- roofline
    rates = {dtype: matmul_rate(dtype) for dtype in pairs}
    fl = next(iter(pairs.values()))[0]
    fwd, active = forward_flops(fl, args.batch, args.seq)
    print("\nroofline: torch.mm 2048^3 at " + ", ".join(
        f"{dtype_name(d)} {r / 1e9:,.0f} GFLOP/s" for d, r in rates.items())
        + f"; {active / 1e6:.2f}M matmul params active per token")
    for case, flops in (("train", 3 * fwd), ("prefill", fwd)):
        ideal = flops / rates[dtype_of[case]]
        sides = ", ".join(f"{side} {t * 1e3:.0f} ms ({t / ideal:.1f}x)"
                          for side, t in results[case].items() if side != "frugallm loop")
        print(f"  {case:<8} {name_of[case]:<5} {flops / 1e9:6.2f} GFLOP -> ideal {ideal * 1e3:6.1f} ms | "
              f"measured (x ideal): {sides}")

    # --- grouped vs loop routed experts
    parts = []
    for case in ("train", "prefill"):
        g, l = results[case]["frugallm"], results[case]["frugallm loop"]
        parts.append(f"{case} ({name_of[case]}) {tokens / g:,.0f} vs {tokens / l:,.0f} tok/s "
                     f"(grouped/loop {l / g:.2f})")
    print("\nfrugallm MoE grouped vs loop (eager): " + "; ".join(parts))

    if args.profile:
        print(f"\ntorch.profiler, one frugallm {name_of['train']} train step (eager, grouped), "
              f"top 15 by self CPU time:")
        fl = pairs[dtype_of["train"]][0]
        fl.train()
        profile_train_step(frugallm_train(fl, ids, targets))


if __name__ == "__main__":
    main()
