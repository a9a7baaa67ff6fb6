"""The `frugallm` command: argument parsing only; every action is a library call."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

import torch


def _info(args: argparse.Namespace) -> int:
    from .config import get_preset
    from .model import Transformer
    from .model.count import count_params
    from .config import ModelConfig

    if args.host:
        from .host import host_profile

        print(host_profile().describe())
        return 0

    cfg = ModelConfig.from_json(args.config) if args.config else get_preset(args.preset)
    counts = count_params(cfg)
    print(f"frugallm model: {'--config ' + args.config if args.config else 'preset ' + args.preset}")
    width = max(len(k) for k in counts)
    for k, v in counts.items():
        print(f"  {k:<{width}}  {v:>17,}  ({v / 1e6:,.2f}M)")
    if counts["total"] > args.max_build_params:
        print(f"  (not built: {counts['total']:,} parameters exceed --max-build-params; counted on the meta device)")
        return 0
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, min(16, cfg.max_seq_len)))
    with torch.no_grad():
        logits = model(ids).logits
    print(f"  forward pass: input {tuple(ids.shape)} -> logits {tuple(logits.shape)}, "
          f"finite={bool(torch.isfinite(logits).all())}")
    print("  parameters by module:")
    rows: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = ".".join(name.split(".")[:3]) if name.startswith(("layers", "mtp")) else name.split(".")[0]
        rows[key] = rows.get(key, 0) + p.numel()
    w = max(len(k) for k in rows)
    for k, v in rows.items():
        print(f"    {k:<{w}}  {v:>12,}")
    return 0


def _train(args: argparse.Namespace, extra: list[str] = (), model_from=None) -> int:
    """`frugallm train`, and `frugallm distill` with its flags as `extra` key=value pairs and, for
    --init-from, the student's ModelConfig as `model_from`."""
    from .config import ModelConfig, TrainConfig, apply_overrides, get_preset
    from .train.trainer import train

    saved = None
    if args.resume:  # a resume starts from the run's own settings: only what is given counts as a change
        from .formats.checkpoint import latest

        saved = latest(args.out)
        if saved is None:
            raise FileNotFoundError(f"--resume: {args.out} holds no valid checkpoint; drop --resume to start a "
                                    "new run there, or pass the run's directory with --out")
    model_cfg = ModelConfig.from_json(args.config) if args.config else get_preset(args.preset) if args.preset \
        else model_from if model_from else ModelConfig.from_json(saved / "config.json") if saved \
        else get_preset(DEFAULT_PRESET)
    train_cfg = TrainConfig.from_json(args.train_config) if args.train_config else \
        TrainConfig.from_json(saved / "train_config.json") if saved else TrainConfig()
    # the length: --time (steps a cap), or --steps alone (no budget), or neither: DEFAULT_TIME, capped at
    # TrainConfig.steps; a --train-config file or --set steps=/time_budget= says it instead (and a
    # resumed run keeps its own)
    time_budget = args.time
    if time_budget is None and args.steps is not None:
        time_budget = ""
    elif time_budget is None and not saved and not args.train_config and not any(
            p.startswith(("steps=", "time_budget=")) for p in args.set or []):
        time_budget = DEFAULT_TIME
    flags = {"data": args.data, "steps": args.steps, "time_budget": time_budget, "save_every": args.save_every,
             "ep": args.ep, "pp": args.pp, "dp": args.dp}
    if saved:  # the layout belongs to this launch, not to the run: a resume on other ranks starts from none
        flags |= {k: v for k, v in (("ep", 1), ("pp", 1), ("dp", 0)) if flags[k] is None}
    pairs = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(extra) + list(args.set or [])
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, pairs)
    if args.nproc:  # check the layout here, before any process starts, then hand over to torchrun
        from .parallel.layout import resolve, torchrun_command

        resolve(model_cfg, train_cfg, args.nproc * args.nnodes)
        cmd = torchrun_command(args.nproc, _without_launch_flags(sys.argv[1:]), args.nnodes, args.node_rank,
                               args.rdzv_endpoint)
        sys.stdout.flush()
        os.execv(cmd[0], cmd)
    result = train(model_cfg, train_cfg, args.out, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    if result.interrupted:
        return 130
    if result.val_loss is not None:
        print(f"val loss {result.val_loss:.3f} (perplexity {math.exp(result.val_loss):.1f}) vs unigram baseline "
              f"{result.unigram_loss:.3f} (perplexity {math.exp(result.unigram_loss):.1f})")
    if args.sample and train_cfg.sample_tokens > 0:
        _print_sample(args.out, train_cfg.sample_prompt, train_cfg.sample_tokens)
    return 0


def _distill(args: argparse.Namespace) -> int:
    """A student trained on a teacher's distribution: an ordinary run whose TrainConfig names the teacher.

    The student's vocabulary is the teacher's tokenizer (token-level KD compares distributions token
    by token); for a teacher with another tokenizer, sample it (`frugallm distill generate`) and train
    on the samples (`frugallm train --data FILE.jsonl`)."""
    if args.distill_command == "generate":
        return _distill_generate(args)
    if not args.teacher:
        raise ValueError("frugallm distill needs --teacher DIR (a frugallm run or Hugging Face DeepSeek directory)")
    from .plan import load
    from .tokenizer import load_tokenizer

    student_tokenizer = load_tokenizer(args.init_from or args.teacher)
    extra = [f"teacher={args.teacher}", f"tokenizer={args.init_from or args.teacher}"]
    extra += [f"{key}={value}" for key, value in (
        ("kd_loss", args.loss), ("kd_beta", args.beta), ("kd_temperature", args.temperature),
        ("kd_weight", args.kd_weight), ("kd_topk", args.topk), ("on_policy", args.on_policy),
        ("init_from", args.init_from)) if value is not None]
    model_from = load(args.init_from).config if args.init_from else None
    if model_from is None and not args.config and not args.resume:
        extra.append(f"vocab_size={student_tokenizer.vocab_size}")  # a preset student speaks the teacher's tokens
    return _train(args, extra, model_from)


def _distill_generate(args: argparse.Namespace) -> int:
    from .distill.generate import generate_samples

    stats = generate_samples(args.teacher, args.prompts, args.out, samples_per_prompt=args.samples,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature_sample,
                             top_p=args.top_p, batch_size=args.batch_size, seed=args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    return 0


def _parallel_simulate(args: argparse.Namespace) -> int:
    """Time 1F1B, ZB-V and DualPipeV op lists with an event simulation, beside DeepSeek-V3 Table 2."""
    import json

    from .parallel.schedule import SCHEDULES, Durations, chrome_trace, format_table, run, summary

    durations = Durations(args.f, args.b, args.w, args.fb)
    results = [run(name, args.pp, args.chunks, durations)
               for name in (SCHEDULES if args.schedule == "all" else (args.schedule,))]
    print(json.dumps([summary(r) for r in results], indent=1) if args.json else format_table(results))
    if args.trace:
        chrome_trace(results, args.trace)
        print(f"wrote {args.trace} (open in chrome://tracing or ui.perfetto.dev; 1 time unit = 1 ms)", file=sys.stderr)
    return 0


def _print_sample(run: str, prompt: str, n_tokens: int) -> None:
    from .plan import load
    from .tokenizer import load_tokenizer
    from .infer.generate import generate

    model, tok = load(run), load_tokenizer(run)
    ids = torch.tensor([[tok.bos_id, *tok.encode(prompt)]])
    n_tokens = min(n_tokens, model.config.max_seq_len - ids.shape[1])
    new = generate(model, ids, n_tokens, temperature=0.8, top_k=40, seed=0, stop=tok.eos_id)
    print(f"--- sample ({n_tokens} tokens max, temperature 0.8, top-k 40) ---")
    print(prompt + tok.decode(new[0].tolist()))
    print("---")


def _eval(args: argparse.Namespace) -> int:
    from .plan import load
    from .tokenizer import load_tokenizer
    from .config import TrainConfig
    from .train import data
    from .host import choose_dtype
    from .train.telemetry import evaluate
    from .formats.checkpoint import latest

    ckpt = latest(args.run)
    if ckpt is None:
        raise FileNotFoundError(f"{args.run} holds no valid checkpoint")
    cfg = TrainConfig.from_json(ckpt / "train_config.json")
    model, tok = load(args.run), load_tokenizer(args.run)
    source = cfg.data if args.data is None else args.data
    splits = data.prepare(source, tok, cfg.val_fraction, cfg.text_field)
    batches = data.val_batches(splits.val, cfg.seq_len, cfg.batch_size, mask=splits.val_mask)
    masks = splits.train_mask, splits.val_mask  # SFT records: only target tokens count
    choice = choose_dtype("prefill")  # eval is a prefill: the host's measured choice
    print(f"frugallm: {choice.reason}", file=sys.stderr)
    autocast = (lambda: torch.autocast("cpu", dtype=choice.dtype)) if choice.dtype == torch.bfloat16 \
        else contextlib.nullcontext
    loss = evaluate(model, batches, args.batches, autocast)
    print(f"{args.run} ({ckpt.name}) on {splits.manifest['source']} val: loss {loss:.4f}, "
          f"perplexity {math.exp(loss):.2f}, unigram baseline "
          f"{data.unigram_loss(splits.train, splits.val, model.config.vocab_size, *masks):.4f}")
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from .tokenizer import train_tokenizer
    from .train import data

    texts = (text for _, text in data.iter_documents(args.data, args.text_field))
    tok = train_tokenizer(texts, args.vocab)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"wrote {tok.save(args.out)} ({tok.vocab_size} tokens)")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_run

    for path in plot_run(args.run):
        print(f"wrote {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .infer.server import serve

    serve(args.run, host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
          slots=args.slots, policy=args.policy, threads=args.threads, compile=args.compile,
          dtype=args.dtype, max_cache_tokens=args.max_cache_tokens, max_queue=args.max_queue,
          request_timeout=args.request_timeout, default_max_tokens=args.default_max_tokens,
          insecure_no_api_key=args.insecure_no_api_key)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .tokenizer import load_tokenizer
    from .infer.chat import chat_repl

    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    model = _load_for_inference(args)
    decoder = _compile(model, args)
    return chat_repl(model, load_tokenizer(args.run), system=args.system,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, seed=args.seed, speculative=args.speculative, decoder=decoder)


def _load_for_inference(args: argparse.Namespace):
    """The model for generate / chat, in the dtype --dtype asks for (auto: the host profile's
    choice), after one line on stderr that says what was chosen and why."""
    from .plan import inference_dtype, load_for_inference
    from .kernels.swap import kernels_in_use

    print(f"frugallm: {inference_dtype(args.dtype).reason}", file=sys.stderr)
    model = load_for_inference(args.run, args.dtype, prepack=not args.compile)
    print(f"frugallm: matmul kernels: {kernels_in_use(model)}", file=sys.stderr)
    return model


def _compile(model, args: argparse.Namespace):
    """With --compile, the compiled decode step, its batch-1 shapes compiled before the first prompt."""
    if not args.compile:
        return None
    from .kernels.compiled import compile_decode

    print("compiling the decode step (once per shape; later runs reuse inductor's cache) ...", file=sys.stderr)
    return compile_decode(model, warmup=True, speculative=args.speculative)


def _generate(args: argparse.Namespace) -> int:
    import time

    from .tokenizer import load_tokenizer
    from .infer.generate import generate_stream

    model = _load_for_inference(args)
    decoder = _compile(model, args)
    tok = load_tokenizer(args.run)
    ids = [tok.bos_id, *tok.encode(args.prompt)] if tok.bos_id is not None else tok.encode(args.prompt)
    stats, text, t0 = {}, tok.stream(), time.perf_counter()
    print(args.prompt, end="", flush=True)
    for step in generate_stream(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=tok.eos_id, speculative=args.speculative,
                                stats=stats, decoder=decoder):
        print(text.push(step[0].tolist()), end="", flush=True)
    print(text.flush())
    wall = time.perf_counter() - t0
    line = (f"[{stats['new_tokens']} tokens in {wall:.2f} s: {stats['new_tokens'] / wall:.1f} tokens/s; "
            f"first token after {stats['prefill_s'] * 1e3:.0f} ms ({stats['prompt_tokens']}-token prompt)")
    if stats.get("decode_s") and stats["new_tokens"] > 1:
        line += f", decode {(stats['new_tokens'] - 1) / stats['decode_s']:.1f} tokens/s"
    if args.speculative:
        line += (f"; speculative: acceptance {stats['acceptance']:.2f}, "
                 f"{stats['tokens_per_forward']:.2f} tokens per forward")
    print(line + "]", file=sys.stderr)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .plan import load
    from .kernels.quantize import weight_bytes
    from .export import quantize_checkpoint

    out = quantize_checkpoint(args.run, args.to, args.out, layout=args.layout)
    sizes = weight_bytes(load(out))
    print(f"wrote {out} ({args.to}, {args.layout or 'default'} layout): {sizes['params']:,} parameters, "
          f"{sizes['bytes'] / 2**20:.1f} MiB, {sizes['bytes_per_param']:.2f} bytes/param")
    return 0


DEFAULT_TIME = "8m"  # `frugallm train` with neither --steps nor --time: the main job fits in 10 minutes
DEFAULT_PRESET = "tiny"  # `frugallm train` with neither --preset nor --config
DTYPE_CHOICES = ["auto", "fp32", "bf16", "float32", "bfloat16", "float64"]
DTYPE_HELP = ("compute dtype (default auto: bf16 only where this host measures it clearly faster than fp32, "
              "see `frugallm info --host`); an explicit dtype dequantizes a quantized checkpoint")
SPECULATIVE_HELP = ("draft with the MTP modules, verify in one forward (exact; on a CPU at batch 1 it gains "
                    "little, and with --compile it can be slower: see the README)")
COMPILE_HELP = ("compile the decode step with torch.compile (1.9-2.6x faster decoding here; tens of seconds of "
                "compiling first, needs a C++ compiler; a quantized checkpoint cannot be compiled)")


def _run_args(p: argparse.ArgumentParser, out: str) -> None:
    """The flags of a training run, shared by `train` and `distill`."""
    p.add_argument("--train-config", help="a TrainConfig JSON file")
    p.add_argument("--data", help="text files, a folder, a glob, JSONL, or hf:NAME (default: the Python stdlib)")
    p.add_argument("--out", default=out, help=f"run directory (default {out})")
    p.add_argument("--steps", type=int, help="the run's length; with --time, the most it may plan (default 500)")
    p.add_argument("--time", help="a time budget for the whole command, e.g. 90s, 8m, 1h: steps are planned from "
                                  f"the measured throughput (default {DEFAULT_TIME} unless --steps is given)")
    p.add_argument("--save-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last good checkpoint")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any ModelConfig or TrainConfig field")
    p.add_argument("--no-sample", dest="sample", action="store_false", help="do not print a sample at the end")
    par = p.add_argument_group("parallelism (torch.distributed; world = ep x pp x dp ranks)")
    par.add_argument("--ep", type=int, help="expert parallelism: shard the routed experts over this many ranks")
    par.add_argument("--pp", type=int, help="pipeline ranks (--set pp_schedule=dualpipev|zbv|1f1b; not with ep/dp)")
    par.add_argument("--dp", type=int, help="data parallelism (FSDP2); default: the world / (ep x pp)")
    par.add_argument("--nproc", type=_positive_int, help="launch this many processes per node with torchrun "
                     "(same as `torchrun --nproc-per-node N -m frugallm train ...`); the layout is checked first")
    par.add_argument("--nnodes", type=_positive_int, default=1, help="machines taking part (with --nproc)")
    par.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1")
    par.add_argument("--rdzv-endpoint", default="", help="HOST:PORT every node meets at (--nnodes > 1)")


LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")


def _without_launch_flags(argv: list[str]) -> list[str]:
    """argv minus the flags that start torchrun (the ranks must not start it again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            out.append(arg)
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


# a missing optional dependency -> the extra that installs it
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "transformers": "hf", "datasets": "data", "jinja2": "hf"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugallm", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="count parameters, build the model and run one forward pass")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="preset name (tiny, small, v2-lite, v3)")
    src.add_argument("--config", help="a ModelConfig JSON file")
    info.add_argument("--host", action="store_true",
                      help="print this machine's profile: ISA, bf16 support, measured fp32/bf16 speeds, auto choices")
    info.add_argument("--max-build-params", type=float, default=2e9,
                      help="only count, do not build, models larger than this (default 2e9)")
    info.set_defaults(func=_info)

    tr = sub.add_parser("train", help="train a model (default: the tiny preset on the built-in corpus)")
    src = tr.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"a named model (default {DEFAULT_PRESET}; with --resume, the run's own)")
    src.add_argument("--config", help="a ModelConfig JSON file")
    _run_args(tr, "runs/tiny")
    tr.set_defaults(func=_train)

    di = sub.add_parser("distill", help="train a student on a teacher's next-token distribution (token-level KD, "
                                        "offline top-k, on-policy); `distill generate` samples a teacher for SFT")
    di.add_argument("--teacher", help="a frugallm run or Hugging Face DeepSeek directory (the student uses its tokenizer)")
    src = di.add_mutually_exclusive_group()
    src.add_argument("--student-preset", dest="preset", help=f"the student's preset (default {DEFAULT_PRESET})")
    src.add_argument("--student-config", dest="config", help="the student's ModelConfig JSON file")
    src.add_argument("--init-from", help="start the student from this run or Hugging Face directory")
    _run_args(di, "runs/distill")
    di.add_argument("--loss", choices=["fkl", "rkl", "jsd", "tvd"], help="the divergence D (default fkl)")
    di.add_argument("--beta", type=float, help="jsd's beta: 0 = forward KL, 1 = reverse KL (default 0.5)")
    di.add_argument("--temperature", type=float, help="tau, softening both distributions (default 1)")
    di.add_argument("--kd-weight", type=float, help="w in (1-w) CE + w tau^2 D (default 0.5)")
    di.add_argument("--topk", type=int, help="offline teacher: cache its top-k log-probs once (default 0: online)")
    di.add_argument("--on-policy", type=float, help="fraction of micro-batches the student samples itself (GKD)")
    dsub = di.add_subparsers(dest="distill_command")
    dg = dsub.add_parser("generate", help="sample a teacher on prompts into prompt/completion or messages JSONL "
                                          "(the R1 recipe: then `frugallm train --data FILE.jsonl`); resumes")
    dg.add_argument("--teacher", required=True, help="a frugallm run, Hugging Face DeepSeek dir or any "
                                                     "transformers causal-LM directory")
    dg.add_argument("--prompts", required=True, help="JSONL with 'prompt' or 'messages' per line, or a .txt file")
    dg.add_argument("--samples", type=_positive_int, default=1, help="samples per prompt (default 1)")
    dg.add_argument("--out", required=True, help="the JSONL file to write (appended to: a rerun resumes)")
    dg.add_argument("--max-new-tokens", type=_positive_int, default=256)
    dg.add_argument("--temperature", dest="temperature_sample", type=float, default=0.7)
    dg.add_argument("--top-p", type=float, default=0.95)
    dg.add_argument("--batch-size", type=_positive_int, default=8)
    dg.add_argument("--seed", type=int, default=0)
    di.set_defaults(func=_distill)

    ev = sub.add_parser("eval", help="validation loss and perplexity of a run")
    ev.add_argument("run")
    ev.add_argument("--data", help="evaluate on this data's val split instead of the run's")
    ev.add_argument("--batches", type=_positive_int, default=16, help="val batches to average (default 16)")
    ev.set_defaults(func=_eval)

    tk = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    tt = tk.add_parser("train", help="train a byte-level BPE with special tokens")
    tt.add_argument("data", nargs="?", default="", help="text/JSONL path or glob (default: the Python stdlib)")
    tt.add_argument("--vocab", type=int, default=4096)
    tt.add_argument("--out", required=True)
    tt.add_argument("--text-field", default="text")
    tt.set_defaults(func=_tokenizer_train)

    pl = sub.add_parser("plot", help="write PNG plots of a run's metrics")
    pl.add_argument("run")
    pl.set_defaults(func=_plot)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the [serve] extra)")
    sv.add_argument("run", help="a frugallm run directory or a Hugging Face DeepSeek directory")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    sv.add_argument("--model-name", help="the model id clients ask for (default: the run directory's name)")
    sv.add_argument("--slots", type=int, default=16, help="requests generated at once; the rest wait in order")
    sv.add_argument("--policy", choices=("batch", "round-robin"), default="batch",
                    help="batch: every running request in one forward per step (continuous batching); "
                    "round-robin: one request per forward, in turn (the reference, for comparison)")
    sv.add_argument("--threads", type=int, help="torch threads (default: the cores less one, which is left to "
                    "the HTTP event loop)")
    sv.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    sv.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    sv.add_argument("--max-cache-tokens", type=int, help="KV-cache budget of all requests together, in tokens; "
                    "each reserves prompt + max_tokens (default: half the free memory, at most slots contexts)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; more get 429")
    sv.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request, queueing included; "
                    "past it: 503, or an error event mid-stream (default 600)")
    sv.add_argument("--default-max-tokens", type=int, default=1024, help="chat max_tokens when a request gives none")
    sv.add_argument("--insecure-no-api-key", action="store_true",
                    help="allow a non-loopback --host without --api-key (anyone who reaches it can use it)")
    sv.set_defaults(func=_serve)

    ch = sub.add_parser("chat", help="an interactive chat in the terminal (/reset, /system TEXT, /exit)")
    ch.add_argument("run", help="a frugallm run directory or a Hugging Face DeepSeek directory")
    ch.add_argument("--system", help="a system prompt")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.8)
    ch.add_argument("--top-k", type=int)
    ch.add_argument("--top-p", type=float)
    ch.add_argument("--seed", type=int)
    ch.add_argument("--speculative", action="store_true", help=SPECULATIVE_HELP)
    ch.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    ch.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    ch.set_defaults(func=_chat)

    ge = sub.add_parser("generate", help="continue a prompt, streaming to the terminal, then report tokens/s")
    ge.add_argument("run", help="a frugallm run directory or a Hugging Face DeepSeek directory")
    ge.add_argument("--prompt", required=True)
    ge.add_argument("--max-new-tokens", type=int, default=128)
    ge.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ge.add_argument("--top-k", type=int)
    ge.add_argument("--top-p", type=float)
    ge.add_argument("--seed", type=int)
    ge.add_argument("--speculative", action="store_true", help=SPECULATIVE_HELP)
    ge.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    ge.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    ge.set_defaults(func=_generate)

    pa = sub.add_parser("parallel", help="pipeline-parallel tools").add_subparsers(dest="parallel_command",
                                                                                    required=True)
    ps = pa.add_parser("simulate", help="simulate 1F1B, ZB-V and DualPipeV op orders: makespan, bubble, peak "
                                        "activations, beside DeepSeek-V3 Table 2")
    ps.add_argument("--schedule", choices=["all", "1f1b", "zbv", "dualpipev"], default="all")
    ps.add_argument("--pp", type=int, required=True, help="pipeline ranks (V schedules hold 2 stages per rank)")
    ps.add_argument("--chunks", type=int, required=True, help="micro-batches per step (dualpipev: >= 2*pp)")
    ps.add_argument("--f", type=float, default=1.0, help="forward time of one micro-batch on one stage (default 1)")
    ps.add_argument("--b", type=float, default=1.0, help="input-grad backward time (default 1)")
    ps.add_argument("--w", type=float, default=1.0, help="weight-grad backward time (default 1; 0 = no split)")
    ps.add_argument("--fb", type=float, help="time of an overlapped F&B pair (default F+B+W: no overlap gain)")
    ps.add_argument("--json", action="store_true", help="print the results as JSON")
    ps.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace of the timelines (one pid per rank)")
    ps.set_defaults(func=_parallel_simulate)

    qu = sub.add_parser("quantize", help="write a weight-only int8 or fp8 copy of a model for CPU inference")
    qu.add_argument("run", help="a frugallm run directory or a Hugging Face DeepSeek directory")
    qu.add_argument("--to", required=True, choices=["int8", "fp8"],
                    help="int8: per output channel; fp8: e4m3 in 128x128 blocks with weight_scale_inv")
    qu.add_argument("--out", required=True, help="output directory (written atomically)")
    qu.add_argument("--layout", choices=["deepseek", "frugallm"],
                    help="deepseek: a Hugging Face DeepSeek FP8 dir (fp8 only, the fp8 default); "
                         "frugallm: frugallm's quantized checkpoint (the int8 default)")
    qu.set_defaults(func=_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors a user can cause print one line that names the problem and its fix,
    and exit 2 (`--debug` shows the traceback instead)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        if args.debug or e.name is None or e.name.split(".")[0] not in EXTRAS:
            raise
        extra = EXTRAS[e.name.split(".")[0]]
        print(f"frugallm: error: `frugallm {args.command}` needs {e.name}, which is not installed; "
              f"install it with: pip install 'frugallm[{extra}]'", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"frugallm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
