"""The `frugallm` command: argument parsing only; every action is a library call."""

from __future__ import annotations

import argparse
import sys

import torch


def _info(args: argparse.Namespace) -> int:
    from . import Transformer, count_params, get_preset
    from .config import ModelConfig

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugallm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="count parameters, build the model and run one forward pass")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="preset name (tiny, small, v2-lite, v3)")
    src.add_argument("--config", help="a ModelConfig JSON file")
    info.add_argument("--max-build-params", type=float, default=2e9,
                      help="only count, do not build, models larger than this (default 2e9)")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"frugallm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
