"""`frugallm serve` under load and at its limits, as a real process on the session's tiny run.

The server holds when it is asked too much: concurrent streams beyond its slots wait in the bounded queue,
a burst past the queue gets 429 with Retry-After, never a 5xx, and /health answers within a second all along;
its peak resident memory (VmHWM) stays under the budget it reports; clients that hang up give their cache
budget back at once; oversized requests get a 400 that names the limit; a request past --request-timeout
ends (503 or a stream's error event) and frees its budget; /docs and /openapi.json need the key too; serving
beyond loopback without a key is refused. Figures print with `pytest -s`. The load (64 streaming clients, then
a burst of 96 requests) takes about 3 s here.
"""

import http.client
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from conftest import serve_process

pytest.importorskip("fastapi")

KEY = "sk-load"
NAME = "tiny-load"
SLOTS, QUEUE, BUDGET = 4, 64, 2000  # cache budget in tokens: under the 2048-token context, so both limits show


def _serve(run, *options):
    return serve_process(run, KEY, "--model-name", NAME, *options)


def call(base: str, method: str, path: str, body=None, key: str | None = KEY, timeout: float = 60,
         raw: bytes | None = None):
    """(status, headers, payload): payload is the JSON body, or for a 200 stream the list of its events."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        conn.request(method, path, body=raw if raw is not None else (None if body is None else json.dumps(body)),
                     headers=headers)
        r = conn.getresponse()
        if r.status == 200 and r.getheader("content-type", "").startswith("text/event-stream"):
            events = []
            for line in r:
                if line.startswith(b"data: "):
                    data = line[6:].strip()
                    events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
            return r.status, dict(r.getheaders()), events
        data = r.read()
        is_json = r.getheader("content-type", "").startswith("application/json")
        return r.status, dict(r.getheaders()), json.loads(data) if is_json else data.decode()
    finally:
        conn.close()


def _peak_rss(proc) -> int:
    with open(f"/proc/{proc.pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))


def _health(base: str) -> dict:
    return call(base, "GET", "/health")[2]


def _settle(base: str, seconds: float = 2.0) -> dict:
    """/health once nothing runs, waits or holds budget; fails after `seconds`."""
    t0 = time.time()
    while True:
        h = _health(base)
        if h["active"] == h["queued"] == h["cache_tokens_reserved"] == 0:
            return h
        assert time.time() - t0 < seconds, f"budget not freed: {h}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tiny_run):
    with _serve(tiny_run, "--slots", str(SLOTS), "--max-queue", str(QUEUE), "--max-cache-tokens", str(BUDGET),
                "--request-timeout", "60") as served:
        yield served


def _chat(i: int, max_tokens: int = 8, stream: bool = True) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": f"ball {i}"}], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": i, "stream": stream}


def _one(base: str, body: dict) -> tuple[int, dict]:
    status, headers, payload = call(base, "POST", "/v1/chat/completions", body)
    if status == 200 and body.get("stream"):  # a complete stream: a finish_reason, then [DONE]
        assert payload[-1] == "[DONE]" and payload[-2]["choices"][0]["finish_reason"] in ("stop", "length"), payload
    if status in (429, 503):
        assert headers.get("retry-after") == "1" and payload["error"]["code"] in ("queue_full", "timeout")
    return status, headers


POLL = """
import sys, threading, time, urllib.request
base, key = sys.argv[1:]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
while not stop.is_set():
    t0 = time.perf_counter()
    req = urllib.request.Request(base + "/health", headers={"Authorization": "Bearer " + key})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
    print(time.perf_counter() - t0, flush=True)
    time.sleep(0.1)
"""


def _load(base: str, proc, clients: int, burst: int) -> None:
    """`clients` streams at once, then, while they run, `burst` more requests at once; /health polled all along."""
    # the poller is a process of its own: in this one it would wait for the GIL behind the clients' threads
    poller = subprocess.Popen([sys.executable, "-c", POLL, base, KEY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    t0 = time.time()
    with ThreadPoolExecutor(clients + burst) as pool:
        streams = [pool.submit(_one, base, _chat(i)) for i in range(clients)]
        time.sleep(0.3)
        bursts = [pool.submit(_one, base, _chat(i, stream=i % 2 == 0)) for i in range(burst)]
        statuses = [f.result()[0] for f in streams + bursts]
    assert statuses[:clients] == [200] * clients, "the streams fit the slots and the queue: all should complete"
    latencies = [float(x) for x in poller.communicate("stop\n", timeout=30)[0].split()]
    assert poller.returncode == 0, "a /health poll failed"
    h = _settle(base)
    peak = _peak_rss(proc)
    count = {k: sum(1 for s in statuses if s // 100 == k) for k in (2, 4, 5)}
    print(f"\nload: {clients} streams + a burst of {burst}: {len(statuses)} requests, 2xx {count[2]}, "
          f"4xx {count[4]} (429: {statuses.count(429)}), 5xx {count[5]} (503: {statuses.count(503)}) in "
          f"{time.time() - t0:.1f} s; /health max {max(latencies) * 1000:.0f} ms over {len(latencies)} polls; "
          f"peak RSS {peak / 2**20:.0f} MiB of a {h['memory_budget_bytes'] / 2**20:.0f} MiB budget")
    assert set(statuses) <= {200, 429, 503} and count[5] == statuses.count(503)
    assert statuses.count(429) >= 1, "the burst should pass the queue limit"
    assert max(latencies) < 1.0, "the server stopped answering /health within 1 s"
    assert peak < h["memory_budget_bytes"]


def test_streams_and_a_burst_past_the_queue(server):
    base, proc = server
    _load(base, proc, clients=64, burst=96)


def test_disconnects_free_the_budget_at_once(server):
    base, _ = server
    # two long streams reserve most of the budget; a third waits for budget although slots are free
    url = urlsplit(base)
    held = []
    for _ in range(2):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "the", "max_tokens": 900,
                                                            "temperature": 0, "stream": True}),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        held.append(conn)
    waiter = http.client.HTTPConnection(url.hostname, url.port, timeout=0.5)  # gives up while queued
    waiter.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "the", "max_tokens": 400}),
                   {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    time.sleep(0.2)
    h = _health(base)
    assert (h["active"], h["queued"]) == (2, 1) and h["cache_tokens_reserved"] > BUDGET - 400
    with pytest.raises(TimeoutError):
        waiter.getresponse()
    waiter.close()
    for conn in held:
        conn.close()
    t0 = time.time()
    _settle(base, seconds=1.0)
    print(f"\ndisconnect: budget back to 0 of {BUDGET} tokens {1000 * (time.time() - t0):.0f} ms after the hang-ups")


def test_oversized_requests_get_400_naming_the_limit(server):
    base, _ = server
    status, _, body = call(base, "POST", "/v1/completions", {"model": NAME, "prompt": [5] * (BUDGET + 1),
                                                             "max_tokens": 1})
    assert status == 400 and body["error"]["code"] == "cache_budget_exceeded" and body["error"]["param"] == "prompt"
    assert f"{BUDGET} tokens" in body["error"]["message"] and "--max-cache-tokens" in body["error"]["message"]
    status, _, body = call(base, "POST", "/v1/chat/completions", _chat(0, max_tokens=BUDGET, stream=True))
    assert status == 400 and body["error"]["param"] == "max_tokens" and "--max-cache-tokens" in body["error"]["message"]
    status, _, body = call(base, "POST", "/v1/chat/completions", _chat(0, max_tokens=5000))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and "2048" in body["error"]["message"]
    status, _, body = call(base, "POST", "/v1/completions", raw=b" " * (2 << 20))
    assert status == 413 and "bytes" in body["error"]["message"]
    status, _, body = call(base, "POST", "/v1/completions", raw=b'{"model": "tiny-load", "prompt": "\\ud800"}')
    assert status == 400 and "surrogate" in body["error"]["message"]
    status, _, body = call(base, "POST", "/v1/chat/completions", {**_chat(0, stream=False), "temperature": 5e-324})
    assert status == 200  # a subnormal temperature decodes greedily, not into NaN probabilities
    # without max_tokens, chat reserves --default-max-tokens (1024), not the rest of the context
    status, _, body = call(base, "POST", "/v1/chat/completions", {**_chat(0, stream=False), "max_tokens": None})
    assert status == 200 and body["usage"]["completion_tokens"] <= 1024


def test_the_key_guards_every_route_and_errors_stay_generic(server):
    base, _ = server
    for path in ("/docs", "/redoc", "/openapi.json", "/health", "/v1/models", "/nowhere"):
        status, headers, body = call(base, "GET", path, key=None)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", path
        assert len(headers["x-request-id"]) == 32
    status, _, spec = call(base, "GET", "/openapi.json")
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert status == 200 and body["content"]["application/json"]["schema"]["$ref"].endswith("/ChatRequest")
    assert spec["components"]["schemas"]["ChatRequest"]["properties"]["model"]["enum"] == [NAME]
    status, _, page = call(base, "GET", "/docs")
    assert status == 200 and "swagger" in page.lower()


def test_request_timeout_ends_the_request_and_frees_its_budget(tiny_run):
    with _serve(tiny_run, "--slots", "1", "--request-timeout", "1.5") as (base, _):
        long = {"model": NAME, "prompt": "the", "max_tokens": 2000, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            streamed = pool.submit(call, base, "POST", "/v1/completions", {**long, "stream": True})
            time.sleep(0.3)
            queued = pool.submit(call, base, "POST", "/v1/completions", long)  # waits behind it, then times out
            t0 = time.time()
            status, headers, body = queued.result()
            waited = time.time() - t0
            assert status == 503 and body["error"]["code"] == "timeout" and headers["retry-after"] == "1"
            assert "--request-timeout" in body["error"]["message"] and waited < 3
            status, _, events = streamed.result()
        assert status == 200 and events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
        assert any(e.get("choices") for e in events[:-2])  # it streamed text before it ran out of time
        _settle(base, seconds=1.0)
        print(f"\ntimeout: a queued request got 503 after {waited:.1f} s; a stream got its error event")


def test_serving_beyond_loopback_needs_a_key(tiny_run):
    r = subprocess.run([sys.executable, "-m", "frugallm.cli", "serve", str(tiny_run), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--api-key" in r.stderr and "--insecure-no-api-key" in r.stderr
    from frugallm.infer.server import InsecureServe, check_exposure

    check_exposure("::1", None)
    check_exposure("0.0.0.0", "key")
    check_exposure("0.0.0.0", None, insecure_no_api_key=True)
    with pytest.raises(InsecureServe):
        check_exposure("example.org", None)


def test_internal_errors_reach_the_log_not_the_client(tiny_run, caplog):
    """An exception in a handler, or in generation on the engine's thread, answers a generic message with the
    request id; the exception's text is only in the log."""
    import asyncio
    import types

    from frugallm import load, load_tokenizer
    from frugallm.infer.engine import Engine, Job
    from frugallm.infer.protocol import Guard

    async def broken(scope, receive, send):
        raise RuntimeError("secret detail /etc/passwd")

    async def run_guard():
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
        server = types.SimpleNamespace(api_key=None, allowed_hosts=None,
                                       metrics=types.SimpleNamespace(request=lambda route, status: None))
        await Guard(broken, server)(scope, receive, send)
        return sent, scope["state"]["rid"]

    sent, rid = asyncio.run(run_guard())
    body = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 500 and body["code"] == "internal_error" and rid in body["message"]
    assert "secret" not in body["message"] and "secret detail" in caplog.text and rid in caplog.text

    model, tok = load(tiny_run), load_tokenizer(tiny_run)

    async def run_engine():
        engine = Engine(model, tok, slots=1)
        try:
            job = engine.submit(Job([10_000], 4, rid="r-42"))  # past the vocabulary: the worker refuses it
            return await job.queue.get()
        finally:
            engine.close()

    assert asyncio.run(run_engine()) == ("error", "internal error")
    assert "r-42" in caplog.text and "vocabulary" in caplog.text
