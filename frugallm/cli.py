"""The `frugallm` command: argument parsing only; every action is a library call."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cli_report import REPORT_COMMANDS
from .cli_rl import EVAL_TASK_FLAGS, GRPO_COMMANDS, eval_task
from .cli_export import EXPORT_COMMAND
from .cli_args import (COMPILE, COMPILE_FLAG, DESCRIPTION, DTYPE, DTYPE_CHOICES, MAX_NEW, RUN_DIR, SAMPLING, SOURCE,
                       HelpFormatter, arg, positive_int, run_args, temperature)
from .config import ModelConfig, get_preset
from .host import host_profile
from .plan import PURPOSES, explain, load, prepare_inference
from .train import launch
from .train.launch import DEFAULT_PRESET


def _pick(args: argparse.Namespace, names) -> dict:
    """The flags `names` as keyword arguments for the library call a command makes."""
    return {name: getattr(args, name) for name in names}


def _say(line: str) -> None:
    """A line about the set-up, on stderr (stdout holds the command's output)."""
    print(f"frugallm: {line}", file=sys.stderr)


def _info(args: argparse.Namespace) -> int:
    if args.host:
        print(host_profile().describe())
        return 0
    if args.plan is not None:
        print(explain(args.purpose, args.plan or None, dtype=args.dtype, compile=args.compile,
                      prepack=args.prepack, fp8=args.fp8).describe())
        return 0
    from .model.count import summary

    cfg = ModelConfig.from_json(args.config) if args.config else get_preset(args.preset)
    for line in summary(cfg, "--config " + args.config if args.config else "preset " + args.preset,
                        args.max_build_params):
        print(line)
    return 0


def _estimate(args: argparse.Namespace) -> int:
    import json

    from .train.estimate import PUBLISHED, lines, parse_tokens, run_estimate

    if args.model:
        from .formats.open import open as open_format

        cfg, label, published = open_format(args.model).config, args.model, None
    elif args.config:
        cfg, label, published = ModelConfig.from_json(args.config), "--config " + args.config, None
    else:
        cfg, label, published = get_preset(args.preset), "preset " + args.preset, PUBLISHED.get(args.preset)
    e = run_estimate(cfg, label, tokens=parse_tokens(args.tokens) if args.tokens else None, seq_len=args.seq_len,
                     gpu=args.gpu, gpus=args.gpus, mfu=args.mfu, price=args.price, published=published)
    print(json.dumps(e, indent=2) if args.json else "\n".join(lines(e)))
    return 0


RUN_FLAGS = ("config", "preset", "train_config", "resume", "data", "steps", "time", "save_every", "ep", "pp", "dp")


def _train(args: argparse.Namespace, extra: list[str] = (), model_from=None) -> int:
    """`frugallm train`, and `frugallm distill` with its flags as `extra` key=value pairs and, for
    --init-from, the student's ModelConfig as `model_from`."""
    from .train.trainer import train

    model_cfg, train_cfg = launch.run_configs(args.out, **_pick(args, RUN_FLAGS),
                                              sets=args.set or [], extra=extra, model_from=model_from)
    if args.nproc:  # check the layout here, before any process starts, then hand over to torchrun
        launch.torchrun(model_cfg, train_cfg, args.nproc, sys.argv[1:], args.nnodes, args.node_rank,
                        args.rdzv_endpoint)
    result = train(model_cfg, train_cfg, args.out, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    if result.interrupted:
        return 130
    if (line := launch.val_line(result)) is not None:
        print(line)
    if args.sample and train_cfg.sample_tokens > 0:
        from .infer.console import print_sample

        print_sample(args.out, train_cfg.sample_prompt, train_cfg.sample_tokens)
    return 0


def _train_command(args: argparse.Namespace) -> int:
    """`frugallm train`: its --init-from and --dsa-stage (launch.train_overrides), then the run."""
    extra, model_from = launch.train_overrides(args.init_from, args.dsa_stage, resume=args.resume)
    return _train(args, extra, model_from)


def _distill(args: argparse.Namespace) -> int:
    """A student trained on a teacher's distribution: an ordinary run whose TrainConfig names the teacher.

    The student's vocabulary is the teacher's tokenizer (token-level KD compares distributions token
    by token); for a teacher with another tokenizer, sample it (`frugallm distill generate`) and train
    on the samples (`frugallm train --data FILE.jsonl`)."""
    if args.distill_command == "generate":
        from .distill.sequences import describe, generate_samples

        stats = generate_samples(args.teacher, args.prompts, args.out, samples_per_prompt=args.samples,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature_sample,
                                 top_p=args.top_p, batch_size=args.batch_size, seed=args.seed)
        print(describe(stats))
        return 0
    kd = _pick(args, ("loss", "beta", "temperature", "kd_weight", "topk", "on_policy"))
    extra, model_from = launch.distill_overrides(args.teacher, args.init_from, config=args.config,
                                                 resume=args.resume, **kd)
    return _train(args, extra, model_from)


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


def _eval(args: argparse.Namespace) -> int:
    if args.task:  # accuracy and pass@k under the task's verifiers (rl/evaluate.py)
        return eval_task(args)
    from .train.telemetry import evaluate_run

    print(evaluate_run(args.run, args.data, args.batches, log=_say))
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from .tokenizer import TOKENIZER, train_tokenizer_dir
    from .train import data

    texts = (text for _, text in data.iter_documents(args.data, args.text_field))
    tok = train_tokenizer_dir(texts, args.vocab, args.out)
    print(f"wrote {Path(args.out) / TOKENIZER} ({tok.vocab_size} tokens)")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_run

    for path in plot_run(args.run, warn=lambda message: _say(f"warning: {message}")):
        print(f"wrote {path}")
    return 0


SERVE_FLAGS = ("host", "port", "api_key", "api_key_file", "allowed_hosts", "model_name", "slots", "policy", "threads",
               "compile", "dtype", "max_cache_tokens", "max_queue", "request_timeout", "default_max_tokens",
               "insecure_no_api_key")


def _serve(args: argparse.Namespace) -> int:
    from .infer.server import serve

    serve(args.run, **_pick(args, SERVE_FLAGS))
    return 0


SAMPLE_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "speculative")


def _prepare(args: argparse.Namespace):
    """generate / chat's model (plan.prepare_inference), its set-up told on stderr: the dtype and why,
    whether the decode step compiles and why, the matmul kernels, and when it compiles the compile of
    batch 1's decode step (kernels/compiled.py says so as it starts), before the first prompt."""
    return prepare_inference(args.run, args.dtype, compile=args.compile, speculative=args.speculative,
                             log=_say)[0]


def _chat(args: argparse.Namespace) -> int:
    from .formats.checkpoint import load_tokenizer
    from .infer.chat import chat_repl

    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    applied = _prepare(args)
    return chat_repl(applied.model, load_tokenizer(args.run), system=args.system, decoder=applied.decoder,
                     **_pick(args, SAMPLE_FLAGS))


def _generate(args: argparse.Namespace) -> int:
    from .formats.checkpoint import load_tokenizer
    from .infer.console import stream_completion

    applied = _prepare(args)
    print(stream_completion(applied.model, load_tokenizer(args.run), args.prompt, decoder=applied.decoder,
                            **_pick(args, SAMPLE_FLAGS)), file=sys.stderr)  # the speeds, once it is written
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .kernels.quantize import weight_bytes
    from .export import quantize_checkpoint
    from .model.count import count_params, in_words

    out = quantize_checkpoint(args.run, args.to, args.out, layout=args.layout)
    model = load(out)
    sizes = weight_bytes(model)  # every weight held, MTP included: the total of in_words
    print(f"wrote {out} ({args.to}, {args.layout or 'default'} layout): {in_words(count_params(model.config))}; "
          f"{sizes['bytes'] / 2**20:.1f} MiB, {sizes['bytes_per_param']:.2f} bytes/param")
    return 0


# --- the parser, as a table -------------------------------------------------------------------------
# (the argument types and the flags several commands share: cli_args.py)
_a, _positive_int, _temperature, _run_args = arg, positive_int, temperature, run_args


# (the subcommand's path, its help, its handler (None: a group of subcommands), its arguments in order)
COMMANDS = [
    (("info",), "count parameters, build the model and run one forward pass", _info, [
        _a("--preset", default="tiny", help="preset name (tiny, small, v2-lite, v3)", **SOURCE),
        _a("--config", help="a ModelConfig JSON file (default: --preset)", **SOURCE),
        _a("--host", action="store_true",
           help="print this machine's profile: ISA, bf16 support, measured fp32/bf16 speeds, auto choices"),
        _a("--max-build-params", type=float, default=2e9,
           help="only count, do not build, models larger than this (default 2e9)"),
        _a("--plan", nargs="?", const="", metavar="RUN", help="print the execution plan for --purpose on this "
           "host and why each part was chosen (with RUN: for its weights, quantized or not; default: no plan, the "
           "parameter counts)"),
        _a("--purpose", choices=PURPOSES, default="inference", help="with --plan (default inference)"),
        _a("--dtype", choices=DTYPE_CHOICES, default="auto", help="with --plan (default auto)"),
        _a("--compile", **COMPILE_FLAG, help="with --plan: as generate's --compile (default: $FRUGALLM_COMPILE or auto)"),
        _a("--fp8", action="store_true", help="with --plan: the plan of FP8 training (--purpose train)"),
        _a("--no-prepack", dest="prepack", action="store_false", help="with --plan: the plan without prepacked "
           "bf16 weights"),
    ]),
    (("train",), "train a model (default: the tiny preset on the built-in corpus)", _train_command, [
        _a("--preset", help=f"a named model (default {DEFAULT_PRESET}; with --init-from, that model's; with "
           "--resume, the run's own)", **SOURCE),
        _a("--config", help="a ModelConfig JSON file (default: --preset)", **SOURCE),
        _a("--init-from", metavar="DIR", help="start from this run's or Hugging Face directory's weights and "
           "tokenizer; with a --preset/--config that adds a DSA indexer to its model (e.g. a tiny run and "
           "--preset tiny-v32) the indexers start fresh (default: random init)"),
        _a("--dsa-stage", choices=["warmup", "sparse"], help="a model with a DSA indexer (DeepSeek-V3.2): "
           "warmup = dense attention, only the indexers learn (their KL to the attention); sparse = top-k "
           "attention, everything learns (default sparse)"),
        *_run_args("runs/tiny"),
    ]),
    (("distill",), "train a student on a teacher's next-token distribution (token-level KD, offline top-k, "
                   "on-policy); `distill generate` samples a teacher for SFT", _distill, [
        _a("--teacher", help="a frugallm run or Hugging Face DeepSeek directory (the student uses its tokenizer; "
           "required, no default)"),
        _a("--student-preset", dest="preset", help=f"the student's preset (default {DEFAULT_PRESET})", **SOURCE),
        _a("--student-config", dest="config", help="the student's ModelConfig JSON file (default: the preset)",
           **SOURCE),
        _a("--init-from", help="start the student from this run or Hugging Face directory (default: a new "
           "student, initialised at random)", **SOURCE),
        *_run_args("runs/distill"),
        _a("--loss", choices=["fkl", "rkl", "jsd", "tvd"], help="the divergence D (default fkl)"),
        _a("--beta", type=float, help="jsd's beta: 0 = forward KL, 1 = reverse KL (default 0.5)"),
        _a("--temperature", type=float, help="tau, softening both distributions (default 1)"),
        _a("--kd-weight", type=float, help="w in (1-w) CE + w tau^2 D (default 0.5)"),
        _a("--topk", type=int, help="offline teacher: cache its top-k log-probs once (default 0: online)"),
        _a("--on-policy", type=float, help="fraction of micro-batches the student samples itself (GKD; default 0)"),
    ]),
    (("distill", "generate"), "sample a teacher on prompts into prompt/completion or messages JSONL (the R1 "
                              "recipe: then `frugallm train --data FILE.jsonl`); resumes", None, [
        _a("--teacher", required=True, help="a frugallm run, Hugging Face DeepSeek dir or any transformers "
                                            "causal-LM directory"),
        _a("--prompts", required=True, help="JSONL with 'prompt' or 'messages' per line, or a .txt file"),
        _a("--samples", type=_positive_int, default=1, help="samples per prompt (default 1)"),
        _a("--out", required=True, help="the JSONL file to write (appended to: a rerun resumes)"),
        _a("--max-new-tokens", type=_positive_int, default=256, help=MAX_NEW + " per sample"),
        _a("--temperature", dest="temperature_sample", type=_temperature, default=0.7,
           help="the teacher's sampling temperature (0 = greedy)"),
        _a("--top-p", type=float, default=0.95, help="nucleus sampling: the likeliest tokens whose probabilities "
           "add up to p"),
        _a("--batch-size", type=_positive_int, default=8, help="samples generated together"),
        _a("--seed", type=int, default=0, help="random seed: a rerun resumes with the same samples"),
    ]),
    (("eval",), "validation loss and perplexity of a run; with --task, accuracy and pass@k", _eval, [
        _a("run", help="a frugallm run directory (its last good checkpoint)"),
        _a("--data", help="evaluate on this data's val split (default: the run's own data)"),
        _a("--batches", type=_positive_int, default=16, help="val batches to average (default 16)"),
        *EVAL_TASK_FLAGS,
    ]),
    *GRPO_COMMANDS,
    (("tokenizer",), "tokenizer tools", None, []),
    (("tokenizer", "train"), "train a byte-level BPE with special tokens", _tokenizer_train, [
        _a("data", nargs="?", default="", help="text/JSONL path or glob (default: the Python stdlib)"),
        _a("--vocab", type=_positive_int, default=4096, help="tokens in the vocabulary, special tokens and the "
           "256 bytes included"),
        _a("--out", required=True, help="directory to write tokenizer.json to (not a run's)"),
        _a("--text-field", default="text", help="the field holding the text in JSONL records"),
    ]),
    (("plot",), "write PNG plots of a run's metrics", _plot, [_a("run", help="a frugallm run directory")]),
    (("serve",), "an OpenAI-compatible HTTP server (needs the [serve] extra)", _serve, [
        RUN_DIR,
        _a("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)"),
        _a("--port", type=int, default=8000, help="TCP port to listen on"),
        _a("--api-key", help="require 'Authorization: Bearer KEY' on every request (visible in `ps`: prefer "
           "--api-key-file or the FRUGALLM_API_KEY environment variable; default: none, any key)"),
        _a("--api-key-file", metavar="FILE", help="read the API key from the first line of FILE (default: none)"),
        _a("--allowed-hosts", nargs="+", default=(), metavar="NAME", help="Host names a server without a key "
           "answers besides localhost, IP addresses and --host ('*': any); others are refused, so that a web "
           "page cannot reach it through DNS rebinding (default: none)"),
        _a("--model-name", help="the model id clients ask for (default: the run directory's name)"),
        _a("--slots", type=int, default=16, help="requests generated at once; the rest wait in order"),
        _a("--policy", choices=("batch", "round-robin"), default="batch",
           help="batch: every running request in one forward per step (continuous batching); "
           "round-robin: one request per forward, in turn (the reference, for comparison)"),
        _a("--threads", type=int, help="torch threads (default: the cores less one, which is left to "
           "the HTTP event loop)"),
        COMPILE,
        DTYPE,
        _a("--max-cache-tokens", type=int, help="KV-cache budget of all requests together, in tokens; "
           "each reserves prompt + max_tokens (default: half the free memory, at most slots contexts)"),
        _a("--max-queue", type=int, default=64, help="requests waiting for a slot; more get 429"),
        _a("--request-timeout", type=float, default=600.0, help="seconds per request, queueing included; "
           "past it: 503, or an error event mid-stream (default 600)"),
        _a("--default-max-tokens", type=int, default=1024, help="chat max_tokens when a request gives none"),
        _a("--insecure-no-api-key", action="store_true",
           help="allow a non-loopback --host without --api-key (anyone who reaches it can use it)"),
    ]),
    (("chat",), "an interactive chat in the terminal (/reset, /system TEXT, /exit); samples at temperature "
                "0.8 by default", _chat, [
        RUN_DIR,
        _a("--system", help="a system prompt (default: none)"),
        _a("--max-new-tokens", type=_positive_int, default=256, help=MAX_NEW + " per reply"),
        _a("--temperature", type=_temperature, default=0.8, help="sampling temperature; chat samples by "
           "default (generate is greedy); 0 = greedy"),
        *SAMPLING, COMPILE, DTYPE,
    ]),
    (("generate",), "continue a prompt, streaming to the terminal, then report tokens/s; greedy by default",
     _generate, [
        RUN_DIR,
        _a("--prompt", required=True, help="the text to continue (bos is put in front of it)"),
        _a("--max-new-tokens", type=_positive_int, default=128, help=MAX_NEW),
        _a("--temperature", type=_temperature, default=0.0, help="sampling temperature; 0 = greedy, the "
           "likeliest token each step, the same text every time (generate's default; chat samples at 0.8)"),
        *SAMPLING, DTYPE, COMPILE,
    ]),
    (("parallel",), "pipeline-parallel tools", None, []),
    (("parallel", "simulate"), "simulate 1F1B, ZB-V and DualPipeV op orders: makespan, bubble, peak "
                               "activations, beside DeepSeek-V3 Table 2", _parallel_simulate, [
        _a("--schedule", choices=["all", "1f1b", "zbv", "dualpipev"], default="all", help="the schedule(s) "
           "to simulate"),
        _a("--pp", type=int, required=True, help="pipeline ranks (V schedules hold 2 stages per rank)"),
        _a("--chunks", type=int, required=True, help="micro-batches per step (dualpipev: >= 2*pp)"),
        _a("--f", type=float, default=1.0, help="forward time of one micro-batch on one stage (default 1)"),
        _a("--b", type=float, default=1.0, help="input-grad backward time (default 1)"),
        _a("--w", type=float, default=1.0, help="weight-grad backward time (default 1; 0 = no split)"),
        _a("--fb", type=float, help="time of an overlapped F&B pair (default F+B+W: no overlap gain)"),
        _a("--json", action="store_true", help="print the results as JSON"),
        _a("--trace", metavar="FILE.json", help="write a Chrome trace of the timelines (one pid per rank; "
           "default: none)"),
    ]),
    (("estimate",), "FLOPs, GPU-hours, days and dollars to train a model (V3's published budget reproduced)",
     _estimate, [
        _a("model", nargs="?", metavar="DIR", help="a run or Hugging Face directory (default: --preset)"),
        _a("--preset", default="v3", help="a named model (default v3); v2, v3 and v32 follow their papers' "
           "published phases unless --tokens is given", **SOURCE),
        _a("--config", help="a ModelConfig JSON file (default: --preset)", **SOURCE),
        _a("--tokens", help="training tokens, e.g. 14.8T, 500B, 2M (default: the preset's published run)"),
        _a("--seq-len", type=positive_int, help="context of the training sequences, which sets the attention "
           "FLOPs (default 4096 or the model's context if shorter; published runs use their own)"),
        _a("--gpu", default="h800", help="h800, h100, h200, a100 (dense bf16 peaks), or cpu: this machine, "
           "its MFU measured by a few real training steps (default h800)"),
        _a("--gpus", type=positive_int, default=2048, help="devices, for the days on the cluster (default 2048)"),
        _a("--mfu", type=float, help="model FLOPs utilisation in (0, 1] (default 0.40, what V3's Table 1 "
           "implies; with --gpu cpu, measured)"),
        _a("--price", type=float, help="$ per device-hour (default 2, as V3's report; none with --gpu cpu)"),
        _a("--json", action="store_true", help="print the estimate as JSON"),
    ]),
    *REPORT_COMMANDS,
    (("quantize",), "write a weight-only int8, int4 or fp8 copy of a model for CPU inference", _quantize, [
        RUN_DIR,
        _a("--to", required=True, choices=["int8", "int4", "fp8"],
           help="int8: per output channel; int4: q4_0 codes, groups of 32; fp8: e4m3 in 128x128 blocks"),
        _a("--out", required=True, help="output directory (written atomically)"),
        _a("--layout", choices=["deepseek", "frugallm"],
           help="deepseek: a Hugging Face DeepSeek FP8 dir (fp8 only, the fp8 default); "
                "frugallm: frugallm's quantized checkpoint (the int8 default)"),
    ]),
    EXPORT_COMMAND,
]
# the dest of each group's subcommand, and whether one must be named (`distill` alone trains)
SUBCOMMANDS = {(): ("command", True), ("distill",): ("distill_command", False), ("grpo",): ("grpo_command", False),
               ("tokenizer",): ("tokenizer_command", True), ("parallel",): ("parallel_command", True)}

# a missing optional dependency -> the extra that installs it
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "transformers": "hf", "datasets": "data", "jinja2": "hf"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugallm", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parsers, subparsers = {(): parser}, {}
    for path, help_text, handler, arguments in COMMANDS:
        parent = path[:-1]
        if parent not in subparsers:
            dest, required = SUBCOMMANDS[parent]
            subparsers[parent] = parsers[parent].add_subparsers(dest=dest, required=required, metavar="COMMAND")
        p = parsers[path] = subparsers[parent].add_parser(path[-1], help=help_text, description=help_text,
                                                          formatter_class=HelpFormatter)
        groups = {}
        for flags, kwargs in arguments:
            kwargs = dict(kwargs)
            exclusive, section = kwargs.pop("exclusive", None), kwargs.pop("section", None)
            if exclusive and exclusive not in groups:
                groups[exclusive] = p.add_mutually_exclusive_group()
            elif section and section not in groups:
                groups[section] = p.add_argument_group(section)
            groups.get(exclusive or section, p).add_argument(*flags, **kwargs)
        if handler is not None:
            p.set_defaults(func=handler)
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
