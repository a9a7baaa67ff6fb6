"""The `frugallm` command's argument types, the flags several commands share, and how --help shows them.

cli.py holds the table of commands; every flag there and here has a help text that says its default
(tests/test_cli.py walks every command's --help).
"""

from __future__ import annotations

import argparse

from .train.launch import DEFAULT_TIME

DESCRIPTION = """\
frugallm trains small DeepSeek-style language models (MLA attention, a mixture of experts, multi-token
prediction) on a CPU, and runs them. `frugallm train` trains the default model in about 8 minutes
(a small base model, on Python's own sources: it completes code, it does not follow instructions);
`frugallm generate runs/tiny --prompt "def main("` continues a prompt with it, `frugallm chat runs/tiny`
and `frugallm serve runs/tiny` talk to it. `frugallm COMMAND --help` describes each command."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default ("(default: 8000)") unless it says it already; the
    description keeps its lines. An on/off flag's default (off) goes without saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "default" not in text and not isinstance(action.default, bool) \
                and action.default not in (None, argparse.SUPPRESS, (), ""):
            text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def temperature(text: str) -> float:
    """A sampling temperature: a finite number >= 0 (NaN would reach torch's sampler as a raw error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (0 = greedy)")
    return value


DTYPE_CHOICES = ["auto", "fp32", "bf16", "float32", "bfloat16", "float64"]
DTYPE_HELP = ("compute dtype (default auto: bf16 only where this host measures it clearly faster than fp32, "
              "see `frugallm info --host`); an explicit dtype dequantizes a quantized checkpoint")
SPECULATIVE_HELP = ("draft with the MTP modules, verify in one forward (exact; on a CPU at batch 1 it gains "
                    "little, and with --compile it can be slower: see the README)")
COMPILE_HELP = ("compile the decode step with torch.compile: 1.9-2.6x faster decoding here, after ~30 s of "
                "compiling at the first start (said on stderr; later starts read inductor's on-disk cache). auto: "
                "compile where it works here, else decode eagerly and say why (no C++ compiler, V4 hybrid attention, "
                "a quantized checkpoint without an explicit --dtype); on (a bare --compile): compile or fail saying "
                "why; off: eager decoding, no wait (default: $FRUGALLM_COMPILE if set, else auto)")


def arg(*flags: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    """One argument: add_argument's flags and keywords, plus `exclusive=NAME` (joins that mutually
    exclusive group of its parser) or `section=TITLE` (listed under that titled group)."""
    return flags, kwargs


SOURCE = {"exclusive": "source"}  # where the model comes from: one of these flags
PARALLEL = {"section": "parallelism (torch.distributed; world = ep x pp x dp ranks)"}
RUN_DIR = arg("run", help="a frugallm run directory, a Hugging Face DeepSeek directory or a llama.cpp deepseek2 .gguf file")
MAX_NEW = "the most tokens to generate (fewer if the model writes its end-of-text token)"
SAMPLING = [arg("--top-k", type=positive_int, help="sample among the k likeliest tokens only (default: all)"),
            arg("--top-p", type=float, help="sample among the likeliest tokens whose probabilities add up to p "
               "(nucleus sampling; default 1: all)"),
            arg("--seed", type=int, help="random seed of the sampling: the same seed, the same text (default: none, "
               "a different sample each time)"),
            arg("--speculative", action="store_true", help=SPECULATIVE_HELP)]
DTYPE = arg("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)


def compile_mode(text: str) -> str:
    """--compile's value (argparse's choices= would name RUN when a bare --compile comes before it)."""
    if text not in ("auto", "on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, on or off (a bare --compile means on: put it "
                                         f"after RUN, or write --compile on)")
    return text


# None: plan.compile_choice's default ($FRUGALLM_COMPILE, else auto), read when the plan is made
COMPILE_FLAG = {"nargs": "?", "const": "on", "type": compile_mode, "metavar": "{auto,on,off}"}
COMPILE = arg("--compile", **COMPILE_FLAG, help=COMPILE_HELP)


def run_args(out: str) -> list:
    """The flags of a training run, shared by `train` and `distill`."""
    return [
        arg("--train-config", help="a TrainConfig JSON file (default: TrainConfig's defaults, then --set)"),
        arg("--data", help="text files, a folder, a glob, JSONL, or hf:NAME (default: the Python stdlib)"),
        arg("--out", default=out, help=f"run directory (default {out})"),
        arg("--steps", type=int, help="the run's length; with --time, the most it may plan (default 500)"),
        arg("--time", help="a time budget for the whole command, e.g. 90s, 8m, 1h: steps are planned from "
                          f"the measured throughput (default {DEFAULT_TIME} unless --steps is given)"),
        arg("--save-every", type=positive_int, help="write a checkpoint every N steps, and at the end (default 200)"),
        arg("--resume", action="store_true", help="continue the run in --out from its last good checkpoint"),
        arg("--set", action="append", metavar="KEY=VALUE", help="any ModelConfig or TrainConfig field, repeatable "
           "(default: none)"),
        arg("--no-sample", dest="sample", action="store_false", help="do not print a sample at the end"),
        arg("--ep", type=int, help="expert parallelism: shard the routed experts over this many ranks (default 1)",
           **PARALLEL),
        arg("--pp", type=int, help="pipeline stages' ranks (--set pp_schedule=dualpipev|zbv|1f1b); combines with "
           "--ep, not yet with --dp > 1 (default 1: no pipeline)", **PARALLEL),
        arg("--dp", type=int, help="data parallelism (FSDP2); default: the world / (ep x pp)", **PARALLEL),
        arg("--nproc", type=positive_int, help="launch this many processes per node with torchrun (same as "
           "`torchrun --nproc-per-node N -m frugallm train ...`); the layout is checked first (default: one "
           "process, no torchrun)", **PARALLEL),
        arg("--nnodes", type=positive_int, default=1, help="machines taking part (with --nproc)", **PARALLEL),
        arg("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1", **PARALLEL),
        arg("--rdzv-endpoint", default="", help="HOST:PORT every node meets at (--nnodes > 1; default: none)",
           **PARALLEL),
    ]
