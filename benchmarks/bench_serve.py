"""`frugallm serve` under load: continuous batching against the round-robin engine, in one run.

Two real servers on the same run (`--policy batch` and `--policy round-robin`, same slots, same dtype) answer
C concurrent streaming clients, C in 1, 4, 16, 64. Each client sends `--requests` completions one after
another: a prompt of 24-120 tokens (different per request) and `--new` output tokens, with end-of-sequence
banned by logit_bias so every request generates exactly `--new` tokens on either server. Per level and server:
  output tokens/s  all output tokens / wall time from the first request to the last token
  TTFT p50 / p99   arrival to the first streamed token, over all requests
The servers take turns level by level (which goes first alternates), so machine drift hits both. Clients are
a few lines of asyncio over raw HTTP (no client library), in this process: they share the machine's cores
with the server under test, and parsing 64 streams costs them CPU too, on both sides alike.

    python benchmarks/bench_serve.py [--run runs/main_default] [--new 64] [--requests 2] [--levels 1 4 16 64]
                                     [--slots 64] [--dtype auto|fp32|bf16] [--save [VARIANT]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import add_host_args, print_host_header, save_output  # noqa: E402

KEY = "bench"


def start(run: str, policy: str, slots: int, dtype: str, threads: int | None) -> tuple[subprocess.Popen, int]:
    log = tempfile.TemporaryFile()  # the server's log (a pipe nobody reads would fill up and block it)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "frugallm.cli", "serve", run, "--port", str(port), "--api-key",
                             KEY, "--model-name", "m", "--policy", policy, "--slots", str(slots), "--max-queue", "256",
                             "--dtype", dtype, *(["--threads", str(threads)] if threads else [])], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the {policy} server exited:\n{log.read().decode()}")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(req, timeout=5):
                return proc, port
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"the {policy} server did not answer within 120 s")
            time.sleep(0.2)


async def stream(port: int, body: dict) -> tuple[float, int]:
    """POST a streaming completion; (seconds to the first token, tokens generated: the usage on its last chunk).
    Raw HTTP/1.1, chunked."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(data)).encode() +
                 b"\r\nConnection: close\r\n\r\n" + data)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"{status!r}: {await reader.read()}")
    while (await reader.readline()) not in (b"\r\n", b""):  # headers
        pass
    ttft, tokens, buffer = None, 0, b""
    while True:
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        buffer += (await reader.readexactly(size + 2))[:-2]
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            payload = event.removeprefix(b"data: ")
            if payload == b"[DONE]":
                continue
            chunk = json.loads(payload)
            if ttft is None and chunk["choices"]:  # the first token's chunk (its text may still be empty)
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    writer.close()
    return ttft, tokens


async def level(port: int, clients: int, requests: int, new: int, prompts: list[list[int]], eos: int | None):
    ttfts, tokens = [], 0

    async def client(c: int):
        nonlocal tokens
        for r in range(requests):
            body = {"model": "m", "prompt": prompts[(c * requests + r) % len(prompts)], "max_tokens": new,
                    "temperature": 0, "stream": True}
            if eos is not None:
                body["logit_bias"] = {str(eos): -100}
            ttft, n = await stream(port, body)
            ttfts.append(ttft)
            tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(ttfts, n=100, method="inclusive") if len(ttfts) > 1 else ttfts * 99
    return {"tok_s": tokens / wall, "p50": statistics.median(ttfts), "p99": q[98], "tokens": tokens, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/main_default", help="a frugallm run or HF directory (the README's main "
                    "job writes runs/main_default)")
    ap.add_argument("--new", type=int, default=64, help="output tokens per request")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--dtype", default="auto", help="the servers' --dtype")
    ap.add_argument("--threads", type=int, help="the servers' --threads (default: torch's choice)")
    add_host_args(ap)
    args = ap.parse_args()
    save_output("bench_serve", args.save)
    print_host_header()
    if not Path(args.run).exists():
        raise SystemExit(f"no run at {args.run}: train one first (the README's main job: `frugallm train`), or pass "
                         f"--run DIR")
    from frugallm import load_tokenizer

    tok = load_tokenizer(args.run)
    rng = random.Random(0)
    words = tok.encode(Path(json.__file__).read_text())  # any text: a stdlib module's source
    prompts = []
    for _ in range(256):
        n, at = rng.randint(24, 120), rng.randrange(len(words) - 120)
        prompts.append(([tok.bos_id] if tok.bos_id is not None else []) + words[at:at + n])
    print(f"run {args.run}; {args.new} new tokens per request, {args.requests} requests per client, prompts of "
          f"24-120 tokens; servers: --slots {args.slots} --dtype {args.dtype}, torch threads: "
          f"{args.threads or 'their default'} ({os.cpu_count()} cores here, shared with the clients)\n")
    servers = {p: start(args.run, p, args.slots, args.dtype, args.threads) for p in ("batch", "round-robin")}
    try:
        for p, (_, port) in servers.items():  # warm both up (first-call allocations, lazy imports)
            asyncio.run(level(port, 2, 1, 8, prompts, tok.eos_id))
        rows = []
        for i, clients in enumerate(args.levels):
            order = ["batch", "round-robin"] if i % 2 == 0 else ["round-robin", "batch"]
            result = {p: asyncio.run(level(servers[p][1], clients, args.requests, args.new, prompts, tok.eos_id))
                      for p in order}
            rows.append((clients, result))
            b, r = result["batch"], result["round-robin"]
            print(f"{clients:>3} clients | batch {b['tok_s']:7.1f} tok/s, TTFT p50 {b['p50']:6.3f} s p99 "
                  f"{b['p99']:6.3f} s | round-robin {r['tok_s']:7.1f} tok/s, TTFT p50 {r['p50']:6.3f} s p99 "
                  f"{r['p99']:6.3f} s | throughput {b['tok_s'] / r['tok_s']:.2f}x, p99 TTFT "
                  f"{b['p99'] / r['p99']:.2f}x", flush=True)
        print("\n| clients | batch tok/s | batch TTFT p50 / p99 (s) | round-robin tok/s | round-robin TTFT p50 / p99 "
              "(s) | throughput ratio | p99 TTFT ratio |")
        print("|---|---|---|---|---|---|---|")
        for clients, result in rows:
            b, r = result["batch"], result["round-robin"]
            print(f"| {clients} | {b['tok_s']:.1f} | {b['p50']:.3f} / {b['p99']:.3f} | {r['tok_s']:.1f} | "
                  f"{r['p50']:.3f} / {r['p99']:.3f} | {b['tok_s'] / r['tok_s']:.2f}x | {b['p99'] / r['p99']:.2f}x |")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
