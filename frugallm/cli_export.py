"""The `frugallm export` command's handler and flags (export.py), in cli.py's table form; beside cli.py
so that it stays within the file size the architecture allows."""

from __future__ import annotations

import argparse
import sys

from .cli_args import RUN_DIR, arg


def export(args: argparse.Namespace) -> int:
    """`frugallm export RUN --to hf|gguf`: what it leaves out on stderr, the path written on stdout."""
    from .export import export as write

    out = write(args.run, args.to, args.out, args.type, log=lambda line: print(f"frugallm: {line}", file=sys.stderr))
    print(f"wrote {out}")
    return 0


EXPORT_COMMAND = (("export",), "write a model with its tokenizer and chat template for other tools: a Hugging "
                               "Face folder or one llama.cpp GGUF file", export, [
    RUN_DIR,
    arg("--to", required=True, choices=["hf", "gguf"],
        help="hf: a Hugging Face DeepSeek folder (transformers, vLLM); gguf: one llama.cpp deepseek2 file "
             "(llama.cpp, Ollama, LM Studio)"),
    arg("--type", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
        help="weight type: hf takes f32, f16 or bf16 (default: as stored); gguf takes all five (default f16, as "
             "llama.cpp's converter); norms and the router stay f32"),
    arg("--out", help="output folder (hf) or .gguf file (default: beside RUN, RUN-hf or RUN-TYPE.gguf; written "
                      "atomically)"),
])
