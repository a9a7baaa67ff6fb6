"""The server's /metrics, in Prometheus' text format (the prometheus-client library).

Each Server has a registry of its own (two servers in one process, as in the tests, do not share counts):
  frugallm_requests_total{route, status}       HTTP requests answered, by route and status code
  frugallm_queue_depth                         requests waiting for a slot or for cache budget
  frugallm_running_requests                    requests being prefilled or decoded
  frugallm_{prefill,decode}_tokens_total       tokens the model read (prompts) and generated
  frugallm_{prefill,decode}_seconds_total      time the worker spent in those forwards
  frugallm_{prefill,decode}_tokens_per_second  over the last `window` seconds of wall time
  frugallm_time_to_first_token_seconds         histogram, from arrival (queueing included)
  frugallm_inter_token_latency_seconds         histogram, between a request's consecutive tokens
  frugallm_cache_tokens_reserved / _budget     the KV cache the running requests hold, and its budget
  frugallm_cache_usage_ratio                   their ratio
`rate(frugallm_decode_tokens_total[1m])` is the usual throughput query; the per-second gauges are for a
glance without PromQL. The engine (worker thread) reports through `count` and `observe`; prometheus-client
is thread-safe.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, queue_stats, window: float = 10.0):
        """queue_stats: a callable giving the engine's queue statistics (engine.py Engine.queue_stats), read at
        scrape time."""
        self.registry = r = CollectorRegistry()
        self.window = window
        self.requests = Counter("frugallm_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.tokens = {k: Counter(f"frugallm_{k}_tokens", f"tokens in {k} forwards", registry=r)
                       for k in ("prefill", "decode")}
        self.seconds = {k: Counter(f"frugallm_{k}_seconds", f"seconds in {k} forwards", registry=r)
                        for k in ("prefill", "decode")}
        self.latency = {
            "ttft": Histogram("frugallm_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r),
            "itl": Histogram("frugallm_inter_token_latency_seconds", "between a request's consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)}
        self._recent = {k: collections.deque() for k in ("prefill", "decode")}  # (time, tokens)
        self._lock = threading.Lock()
        gauges = {"queue_depth": ("requests waiting", lambda: queue_stats()["queued"]),
                  "running_requests": ("requests running", lambda: queue_stats()["active"]),
                  "cache_tokens_reserved": ("KV-cache tokens held", lambda: queue_stats()["cache_tokens_reserved"]),
                  "cache_tokens_budget": ("KV-cache budget in tokens", lambda: queue_stats()["max_cache_tokens"]),
                  "cache_usage_ratio": ("reserved / budget",
                                        lambda: queue_stats()["cache_tokens_reserved"]
                                        / queue_stats()["max_cache_tokens"]),
                  "prefill_tokens_per_second": ("prompt tokens per second, recent", lambda: self.rate("prefill")),
                  "decode_tokens_per_second": ("generated tokens per second, recent", lambda: self.rate("decode"))}
        for name, (doc, read) in gauges.items():
            Gauge(f"frugallm_{name}", doc, registry=r).set_function(read)

    def count(self, name: str, n: int, seconds: float) -> None:
        """`n` tokens went through a prefill ("prefill_tokens") or decode ("decode_tokens") forward."""
        kind = name.removesuffix("_tokens")
        self.tokens[kind].inc(n)
        self.seconds[kind].inc(seconds)
        with self._lock:
            self._recent[kind].append((time.monotonic(), n))

    def observe(self, name: str, value: float) -> None:
        self.latency[name].observe(value)

    def rate(self, kind: str) -> float:
        now = time.monotonic()
        with self._lock:
            recent = self._recent[kind]
            while recent and recent[0][0] < now - self.window:
                recent.popleft()
            return sum(n for _, n in recent) / self.window

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
