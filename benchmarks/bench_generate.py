"""Local inference on the CPU: frugallm vs transformers, the latent cache, speculative decoding,
weight-only int8/fp8, and decode speed against this machine's memory bandwidth.

Sections (one run, side by side):
  1. memory bandwidth of this machine (read a 1 GiB buffer), and a ~100M-parameter model's decode
     tokens/s against the bound bandwidth / weight bytes read per token (batch 1);
  2. frugallm vs transformers on identical weights (the ~100M model, written with to_hf):
     the same greedy tokens in fp32, then decode tokens/s at batch 1 and 8 and time to first
     token, both sides in the same dtype, and KV-cache bytes per token (latent vs transformers' full K/V);
  3. speculative decoding on a trained run (default runs/tiny, the README's main job):
     acceptance, tokens per forward, speed-up over plain greedy (same tokens, checked);
  4. weight-only int8 / fp8 vs fp32 / bf16 on the trained run: bytes per parameter, decode tokens/s.

Timings alternate the sides within one process and report medians, so machine drift hits both.

Dtype (sections 1-3): the host's best for generation, frugallm/host.py choose_dtype("inference")
(one dtype runs prefill and decode; bf16 only where it measures clearly faster here), for frugallm
and transformers alike, unless --dtype forces one; the output names it. Section 4 compares the
dtypes on purpose (its rows are named by dtype).

    python benchmarks/bench_generate.py [--run runs/tiny] [--new 64] [--rounds 3] [--dtype auto|fp32|bf16]
                                        [--skip hf spec quant] [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import frugallm
from frugallm.infer import KVCache
from frugallm.kernels.compiled import compile_decode
from frugallm.infer.generate import generate
from frugallm.model.moe import MoE
from frugallm.kernels.prepack import prepack, unavailable_reason

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, dtype_name, pick_dtype, print_host_header, save_output  # noqa: E402


def bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `reps` sums over a buffer far larger than the caches."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = min(_time(lambda: x.sum()) for _ in range(reps))
    return x.numel() * 4 / best


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def m100_config() -> frugallm.ModelConfig:
    """The `small` preset widened to ~100M parameters (dim 768, 11 layers), MoE as in small."""
    return frugallm.get_preset("small").replace(dim=768, n_layers=11, n_mtp=0)


def random_model(cfg, dtype) -> frugallm.Transformer:
    torch.manual_seed(0)
    model = frugallm.Transformer(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.bias.normal_(std=0.01)  # routing stays token-dependent but the bias is exercised
    return model.to(dtype).eval()


def weight_bytes_read(named_params, cfg, S: int = 1) -> float:
    """Bytes of weights a batch-1 forward over S tokens reads: every matrix, the routed experts by
    the expected union of the S tokens' choices under uniform routing, E (1 - (1 - K/E)^S) of E
    (K of E at S = 1); the embedding table counts as nothing (one row per token)."""
    chosen = 1 - (1 - cfg.n_activated_experts / cfg.n_routed_experts) ** S
    return sum(p.numel() * p.element_size() * (chosen if n.endswith(("ffn.experts.w1", "ffn.experts.w2", "ffn.experts.w3")) else 1)
               for n, p in named_params if not n.endswith("embed.weight"))


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one batch-1 decode token reads through the main model (no MTP)."""
    return int(weight_bytes_read([(n, p) for n, p in model.named_parameters() if not n.startswith("mtp.")],
                                 model.config))


def ours_decode(model, prompts, new: int, decoder=None) -> tuple[float, float]:
    """(decode tokens/s over the batch, seconds to the first token) of one greedy generate."""
    stats = {}
    generate(model, prompts, new, stats=stats, decoder=decoder)
    return len(prompts) * (new - 1) / stats["decode_s"], stats["prefill_s"]


def hf_decode(hf, prompts: torch.Tensor, new: int) -> tuple[float, float]:
    """Same for transformers.generate: TTFT = a 1-token generate, decode = the rest."""
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)
    with torch.inference_mode():
        ttft = _time(lambda: hf.generate(prompts, max_new_tokens=1, min_new_tokens=1, **kw))
        full = _time(lambda: hf.generate(prompts, max_new_tokens=new, min_new_tokens=new, **kw))
    return prompts.shape[0] * (new - 1) / max(full - ttft, 1e-9), ttft


def hf_cache_bytes_per_token(hf, T: int) -> int:
    ids = torch.randint(0, hf.config.vocab_size, (1, T))
    with torch.inference_mode():
        past = hf(ids, use_cache=True).past_key_values
    tensors = [t for layer in past.layers for t in (layer.keys, layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors) // T


def median_pairs(fns: dict, rounds: int) -> dict:
    """Alternate the callables `rounds` times; the per-key median of each returned tuple."""
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(fn())
    return {k: tuple(statistics.median(x[i] for x in v) for i in range(len(v[0]))) for k, v in out.items()}


def section_bandwidth_and_hf(args) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    choice = pick_dtype("inference", args.dtype)
    dtype = choice.dtype
    print(f"\n{choice.reason}")
    cfg = m100_config()
    counts = frugallm.count_params(cfg)
    print(f"machine: {torch.get_num_threads()} threads, read bandwidth {bandwidth() / 1e9:.1f} GB/s (once, at the "
          f"start; the bound below uses the median of the rounds, measured between the decode runs)")
    print(f"model: `small` widened (dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_routed_experts} experts, "
          f"top-{cfg.n_activated_experts}): {counts['total'] / 1e6:.1f}M parameters, "
          f"{counts['active'] / 1e6:.1f}M active")
    torch.manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt))
    batch8 = torch.randint(0, cfg.vocab_size, (8, args.prompt))
    with tempfile.TemporaryDirectory() as tmp:
        frugallm.to_hf(random_model(cfg, torch.float32), Path(tmp) / "m", dtype=torch.float32)
        ours32 = frugallm.from_hf(Path(tmp) / "m").eval()
        hf32 = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32).eval()
        a = generate(ours32, prompt, 16)
        with torch.inference_mode():
            b = hf32.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]
        print(f"greedy tokens, fp32, 16 new: frugallm == transformers: {torch.equal(a, b)}")
        del ours32, hf32
        ours = frugallm.from_hf(Path(tmp) / "m", dtype=dtype).eval()
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=dtype).eval()
    impls = [i for i in ("eager", "grouped_mm", "batched_mm") if i == "eager" or _hf_has_impl(i)]

    def hf_with(impl, prompts):  # transformers with one of its CPU experts implementations
        hf.set_experts_implementation(impl)
        return hf_decode(hf, prompts, args.new)
    per_token = weight_bytes_per_token(ours)
    plain = ours  # frugallm's model as loaded, F.linear on plain weights (transformers' kernels)
    no_prepack = unavailable_reason(plain)
    # `frugallm generate/chat/serve` without --compile: oneDNN-prepacked weights (bf16 where the host packs them)
    packed = plain if no_prepack else copy.deepcopy(plain)
    prepack(packed)
    eager_label = "  eager, plain weights" if no_prepack else "  eager, prepacked"
    ours = copy.deepcopy(plain)
    decoder = compile_decode(ours)  # with --compile: the decode step as one inductor graph
    t = time.perf_counter()
    for batch in (1, 8):
        decoder.warmup(batch)
    compile_s = time.perf_counter() - t
    ours_decode(packed, prompt, 4)  # warm-up
    # the host's speed drifts by tens of percent over minutes: measure the bandwidth in every round,
    # next to the decode runs it bounds, rather than once
    res = median_pairs({"bw": lambda: (bandwidth(reps=3),),
                        **({} if no_prepack else {"plain1": lambda: ours_decode(plain, prompt, args.new)}),
                        "packed1": lambda: ours_decode(packed, prompt, args.new),
                        "ours1": lambda: ours_decode(ours, prompt, args.new, decoder),
                        "packed8": lambda: ours_decode(packed, batch8, args.new),
                        "ours8": lambda: ours_decode(ours, batch8, args.new, decoder),
                        **{f"hf1:{i}": lambda i=i: hf_with(i, prompt) for i in impls},
                        **{f"hf8:{i}": lambda i=i: hf_with(i, batch8) for i in impls}}, args.rounds)
    # transformers at its best implementation for each measure (the best differs between them)
    best = {"1": max(impls, key=lambda i: res[f"hf1:{i}"][0]), "8": max(impls, key=lambda i: res[f"hf8:{i}"][0]),
            "ttft": min(impls, key=lambda i: res[f"hf1:{i}"][1])}
    res["hf1"] = (res[f"hf1:{best['1']}"][0], res[f"hf1:{best['ttft']}"][1])
    res["hf8"] = res[f"hf8:{best['8']}"]
    bw = res["bw"][0]
    bound = bw / per_token
    if no_prepack:
        print(f"(no prepacked row: {no_prepack})")
    print(f"\n{choice.name} on both sides, prompt {args.prompt}, {args.new} new tokens, median of {args.rounds} "
          f"alternated runs; "
          f"transformers at its best experts_implementation per row (batch 1: {best['1']}, batch 8: {best['8']}, "
          f"first token: {best['ttft']}, of {', '.join(impls)}); frugallm's decode step compiled (compile_decode, "
          f"{compile_s:.0f} s for batch 1 and 8, once per process)")
    print(f"{'':26}{'frugallm':>12}{'transformers':>14}{'ratio':>8}")
    for label, key in (("decode tok/s, batch 1", "1"), ("decode tok/s, batch 8", "8")):
        o, h = res["ours" + key][0], res["hf" + key][0]
        print(f"{label:26}{o:12.1f}{h:14.1f}{o / h:7.2f}x")
        p = res["packed" + key][0]
        print(f"{eager_label:26}{p:12.1f}{h:14.1f}{p / h:7.2f}x   (compiling: {o / p:.2f}x)")
        if key == "1" and not no_prepack:
            p = res["plain1"][0]
            print(f"{'  eager, plain weights':26}{p:12.1f}{h:14.1f}{p / h:7.2f}x")
    for label, key in (("time to first token, ms", "ours1"), (eager_label, "packed1")):
        o, h = res[key][1] * 1e3, res["hf1"][1] * 1e3  # prefill is eager either way
        print(f"{label:26}{o:12.1f}{h:14.1f}{h / o:7.2f}x faster")
    ours_kv = KVCache(ours.config, 1, 8, dtype=dtype).bytes_per_token()
    hf_kv = hf_cache_bytes_per_token(hf, 64)
    print(f"{'KV cache bytes / token':26}{ours_kv:12,}{hf_kv:14,}{hf_kv / ours_kv:7.1f}x smaller")
    c = ours.config  # what a per-head K/V cache of the same model would hold (docs/design/kv-cache.md)
    full_kv = c.n_layers * c.n_heads * (c.qk_head_dim + c.v_head_dim) * torch.empty(0, dtype=dtype).element_size()
    print(f"  (a per-head K/V cache would hold {full_kv:,} bytes/token, {full_kv / ours_kv:.1f}x the latent; "
          f"transformers {transformers.__version__} caches the latent too)")
    print(f"\nbandwidth bound, batch 1: {per_token / 1e6:.1f} MB of weights read per token -> "
          f"{bound:.1f} tok/s at {bw / 1e9:.1f} GB/s; frugallm decodes {res['ours1'][0]:.1f} tok/s = "
          f"{res['ours1'][0] / bound:.0%} of the bound ({eager_label.strip()}: {res['packed1'][0] / bound:.0%})")


def _hf_has_impl(name: str) -> bool:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return name in ALL_EXPERTS_FUNCTIONS


def held_out_texts(run: Path, n: int) -> list[str]:
    """The first n documents of the run's validation split (never trained on)."""
    from frugallm.train.config import TrainConfig
    from frugallm.train import data
    from frugallm.formats.checkpoint import latest

    cfg = TrainConfig.from_json(latest(run) / "train_config.json")
    docs = (text for doc_id, text in data.iter_documents(cfg.data, cfg.text_field)
            if data.is_val(doc_id, cfg.val_fraction) and len(text) > 2000)
    return [next(docs) for _ in range(n)]


def section_speculative(args) -> None:
    run = Path(args.run)
    if not run.exists():
        print(f"\n(speculative and quantization sections skipped: no run at {run}; train one with `frugallm train`)")
        return
    tok = frugallm.load_tokenizer(run)
    eager = frugallm.load_for_inference(run, dtype=args.dtype)  # the host's inference dtype; bf16 is prepacked
    compiled = frugallm.load_for_inference(run, dtype=args.dtype, prepack=False)
    dtype = next(eager.parameters()).dtype
    eager_label = "eager, prepacked" if any(type(m).__name__.startswith("Packed") for m in eager.modules()) \
        else "eager"
    decoder = compile_decode(compiled, warmup=True, speculative=True)
    prompts = [[tok.bos_id, *tok.encode(text)[: args.prompt]] for text in held_out_texts(run, args.n_prompts)]
    D = eager.config.n_mtp
    print(f"\nspeculative decoding on {run} ({dtype_name(dtype)}, batch 1, greedy, {len(prompts)} "
          f"held-out {args.prompt}-token prompts x {args.new} new tokens), median of {args.rounds}:")
    for label, model, dec in ((eager_label, eager, None), ("compiled", compiled, decoder)):
        timed = TimedDecoder(model, dec)
        gen = lambda p, **kw: generate(model, [p], args.new, decoder=timed, **kw)
        plain = [gen(p) for p in prompts]  # also compiles any shape the warm-up missed
        spec_stats, outs = [], []

        def spec():
            stats = {}
            outs[:] = []
            t = _time(lambda: outs.extend(gen(p, speculative=True, stats=stats) for p in prompts))
            spec_stats.append(stats)
            return (t,)

        spec()
        timed.reset()
        res = median_pairs({"plain": lambda: (_time(lambda: [gen(p) for p in prompts]),), "spec": spec}, args.rounds)
        same = all(torch.equal(a, b) for a, b in zip(plain, outs))
        acc = statistics.mean(s["acceptance"] for s in spec_stats)
        tpf = statistics.mean(s["tokens_per_forward"] for s in spec_stats)
        print(f"  {label}: same tokens as greedy: {same}; acceptance {acc:.2f}, {tpf:.2f} tokens per main-model "
              f"forward; speed-up {res['plain'][0] / res['spec'][0]:.2f}x ({res['plain'][0]:.2f} s -> "
              f"{res['spec'][0]:.2f} s)")
        # Why: a speculative step = one main forward over D+1 tokens + the MTP drafts; a plain step =
        # one main forward over 1 token. On a GPU the first is ~flat in S; on a CPU at batch 1 it is
        # not (a MoE reads the union of the tokens' experts) and the drafts read the output head
        # again, so the speed-up is at most tokens-per-forward / (speculative step / plain step).
        # Timed inside these very runs: weights come from memory, as they do in real decoding (a
        # draft timed in a loop of its own found its 21 MB in the L3 cache and looked ~1.6x cheaper).
        main, verify = timed.ms["main", 1], timed.ms["main", D + 1]
        draft = timed.per_step("mtp")
        ratio = (verify + draft) / main
        print(f"    per step, ms (in these runs): plain forward (1 token) {main:.2f}; verify forward ({D + 1} tokens) "
              f"{verify:.2f}; MTP drafts {draft:.2f} -> a speculative step costs {ratio:.2f}x a plain one, so "
              f"{tpf:.2f} tokens per forward can give at most {tpf / ratio:.2f}x")
    plain_b, verify_b, draft_b = spec_bytes(eager.config, dtype)
    print(f"  weights read per step: plain {plain_b / 1e6:.1f} MB; verify ({D + 1} tokens, expected union of experts) "
          f"{verify_b / 1e6:.1f} MB; drafts {draft_b / 1e6:.1f} MB (output head included) -> with every forward at "
          f"full bandwidth, {tpf:.2f} tokens per forward would give {tpf * plain_b / (verify_b + draft_b):.2f}x")


def spec_bytes(cfg, dtype=torch.bfloat16) -> tuple[float, float, float]:
    """Weight bytes (in `dtype`) read at batch 1 by a plain step, a verify step over D+1 tokens and
    the D drafts (each: its MTP block, then the shared output head again). Counted on a meta-device
    model: the run's own model may be prepacked, its matrices then no longer parameters."""
    with torch.device("meta"):
        model = frugallm.Transformer(cfg).to(dtype)
    main = [(n, p) for n, p in model.named_parameters() if not n.startswith("mtp.")]
    head = model.head.weight.numel() * model.head.weight.element_size()
    drafts = sum(weight_bytes_read(m.named_parameters(), cfg) + head for m in model.mtp)
    return weight_bytes_read(main, cfg), weight_bytes_read(main, cfg, cfg.n_mtp + 1), drafts


class TimedDecoder:
    """A `generate(decoder=)` that runs the eager model (or a compiled decoder) and times every
    call: `ms[("main", S)]` the median main forward over S tokens; MTP drafting windows under
    ("mtp", width). Synchronous on a CPU, so wall time is the forward's time."""

    def __init__(self, model, decoder=None):
        self.model, self.decoder = model, decoder
        self.reset()

    def reset(self) -> None:
        self.times: dict[tuple[str, int], list[float]] = {}

    def _timed(self, key, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        self.times.setdefault(key, []).append(time.perf_counter() - t)
        return out

    def __call__(self, ids, cache):
        fn = self.decoder or (lambda x, c: self.model(x, cache=c, absorb=True))
        return self._timed(("main", ids.shape[1]), fn, ids, cache)

    def mtp_step(self, depth, h_prev, next_ids, cache, absorb=None, logits_at=None):
        fn = self.decoder.mtp_step if self.decoder else self.model.mtp_step
        return self._timed(("mtp", next_ids.shape[1]), fn, depth, h_prev, next_ids, cache, absorb, logits_at)

    @property
    def ms(self) -> dict:
        return {k: statistics.median(v) * 1e3 for k, v in self.times.items()}

    def per_step(self, kind: str) -> float:
        """Mean ms per speculative step spent in `kind` calls of the usual widths (the wide first
        drafting window after each prefill excluded), weighted as they occurred."""
        usual = {k: v for k, v in self.times.items() if k[0] == kind and k[1] <= self.model.config.n_mtp + 1}
        steps = len(self.times[("main", self.model.config.n_mtp + 1)])
        return sum(sum(v) for v in usual.values()) / max(steps, 1) * 1e3


def section_quant(args) -> None:
    """Weight-only int8 / fp8 vs fp32 / bf16 on the trained run (bench_quant.py's measurement)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_quant import measure, print_table, val_data, variants

    run = Path(args.run)
    if not run.exists():
        return
    from frugallm.formats.checkpoint import latest

    models = variants(frugallm.load(run, dtype=torch.float32))
    torch.manual_seed(0)
    prompt = torch.randint(0, models["fp32"].config.vocab_size, (1, args.prompt))
    print(f"\nweight-only quantization on {run} (batch-1 cached decode, {args.new} tokens, median of {args.rounds}; "
          f"val loss on 8 held-out batches):")
    print_table(measure(models, prompt, args.new, args.rounds, val_data(latest(run), 8)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/tiny", help="a trained run with MTP (default runs/tiny)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens for the speed sections")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-prompts", type=int, default=4, help="held-out documents for the speculative section")
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf", "spec", "quant"])
    add_host_args(parser, dtype_help="dtype of sections 1-3, both sides (auto: the host's inference choice)")
    args = parser.parse_args()
    save_output("bench_generate", args.save)
    print_host_header()
    if "hf" not in args.skip:
        section_bandwidth_and_hf(args)
    if "spec" not in args.skip:
        section_speculative(args)
    if "quant" not in args.skip:
        section_quant(args)


if __name__ == "__main__":
    main()
