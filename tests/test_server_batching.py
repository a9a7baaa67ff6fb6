"""Continuous batching and the OpenAI options built on it: a request's output does not depend on what runs beside
it; log-probs equal a direct computation with the model; n, echo, penalties, logit_bias; /metrics."""

import asyncio
import json
import urllib.request

import openai
import pytest
import torch

from conftest import serve_process

KEY = "batch-key"


@pytest.fixture(scope="module")
def model_tok(tiny_run):
    from frugallm import load, load_tokenizer

    return load(tiny_run).eval(), load_tokenizer(tiny_run)


def _run(model, tok, specs: list[dict], cancel: int | None = None, **engine_args) -> list[dict]:
    """Submit one Job per spec at once; each result: text, log-prob records, prompt records, final event.
    cancel: the index of a job to cancel after its third text event (a client that hangs up)."""
    from frugallm.infer.engine import Engine, Job

    async def run():
        engine = Engine(model, tok, **engine_args)
        try:
            jobs = [engine.submit(Job(**spec)) for spec in specs]

            async def collect(i, job):
                out = {"text": "", "records": [], "prompt": [], "final": None, "events": 0}
                while True:
                    event = await job.queue.get()
                    if event[0] == "text":
                        out["text"] += event[1]
                        out["records"] += event[2]
                        out["events"] += 1
                        if i == cancel and out["events"] == 3:
                            engine.cancel(job)
                            return out
                    elif event[0] == "prompt":
                        out["prompt"] = event[1]
                    else:
                        out["final"] = event
                        return out

            return await asyncio.gather(*(collect(i, j) for i, j in enumerate(jobs)))
        finally:
            engine.close()

    return asyncio.run(run())


def _prompts(tok) -> list[list[int]]:
    words = "the cat sat on a mat and the dog ran to the park with a ball".split()
    return [[tok.bos_id, *tok.encode(" ".join(words[: 2 + 3 * i]))] for i in range(5)]


def test_batched_equals_alone_and_generate(model_tok):
    """Greedy requests give the same tokens alone (one slot), batched (five at once) and through generate()."""
    from frugallm import generate

    model, tok = model_tok
    specs = [dict(prompt=p, max_tokens=24, temperature=0.0) for p in _prompts(tok)]
    alone = _run(model, tok, specs, slots=1)
    batched = _run(model, tok, specs, slots=5)
    assert [r["text"] for r in batched] == [r["text"] for r in alone]
    for spec, r in zip(specs, batched):
        ids = generate(model, [spec["prompt"]], 24, stop=tok.eos_id)[0].tolist()
        ids = ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids
        assert r["text"] == tok.decode(ids)
        assert r["final"][0] == "done" and r["final"][2]["completion_tokens"] == len(ids) + (len(ids) < 24)


def test_a_disconnect_mid_batch_leaves_the_others_unchanged(model_tok):
    model, tok = model_tok
    specs = [dict(prompt=p, max_tokens=24, temperature=0.0) for p in _prompts(tok)[:4]]
    alone = _run(model, tok, specs, slots=1)
    batched = _run(model, tok, specs, cancel=1, slots=4)
    assert batched[1]["final"] is None and batched[1]["events"] == 3
    assert [r["text"] for i, r in enumerate(batched) if i != 1] == [r["text"] for i, r in enumerate(alone) if i != 1]


def test_a_seed_reproduces_a_sample_batched_or_not(model_tok):
    model, tok = model_tok
    prompts = _prompts(tok)
    sampled = dict(prompt=prompts[2], max_tokens=20, temperature=1.0, seed=7)
    others = [dict(prompt=p, max_tokens=20, temperature=1.0, seed=100 + i) for i, p in enumerate(prompts)]
    alone = _run(model, tok, [sampled], slots=1)[0]["text"]
    assert _run(model, tok, [*others[:2], sampled, *others[2:]], slots=6)[2]["text"] == alone
    assert _run(model, tok, [{**sampled, "seed": 8}], slots=1)[0]["text"] != alone


def test_long_prompts_are_read_between_decode_steps(model_tok):
    """While a 200-token prompt is read 16 tokens a forward, a running request keeps getting a token each step."""
    model, tok = model_tok
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        long = [tok.bos_id, *(tok.encode(" the cat sat on a mat") * 40)][:200]
        specs = [dict(prompt=_prompts(tok)[0], max_tokens=60, temperature=0.0),
                 dict(prompt=long, max_tokens=4, temperature=0.0)]
        _run(model, tok, specs, slots=2, prefill_chunk=16)
    finally:
        hook.remove()
    reads = [i for i, shape in enumerate(seen) if shape == (1, 16)]
    assert len(reads) >= 200 // 16 and max(s[0] * s[1] for s in seen) <= 16
    between = seen[reads[0]:reads[-1]]
    assert sum(shape == (1, 1) for shape in between) >= len(reads) - 1  # a decode step after each chunk


def test_logprobs_are_those_of_the_sampling_distribution(model_tok):
    """Each generated token's log-prob and alternatives equal log(probs(logits, temperature, top_k)) from one
    forward over prompt + completion; echo's prompt records equal the model's log-softmax."""
    from frugallm.infer.sampling import LOGPROB_FLOOR, probs

    model, tok = model_tok
    prompt = _prompts(tok)[1]
    for spec in (dict(temperature=0.8, top_k=40, seed=3), dict(temperature=0.0)):
        r = _run(model, tok, [dict(prompt=prompt, max_tokens=12, logprobs=3, prompt_logprobs=True, **spec)],
                 slots=1)[0]
        ids = [t for t, _, _ in r["records"]]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0].float()
        raw = logits.log_softmax(-1)
        assert [t for t, _, _ in r["prompt"]] == prompt and r["prompt"][0][1] is None
        for i, (token, lp, top) in enumerate(r["prompt"][1:]):
            assert lp == pytest.approx(float(raw[i, token]), abs=1e-4)
            assert [a for a, _ in top] == raw[i].topk(3).indices.tolist()
        for i, (token, lp, top) in enumerate(r["records"]):
            row = logits[len(prompt) - 1 + i]
            want = (probs(row, spec["temperature"], spec.get("top_k")).log() if spec["temperature"]
                    else row.log_softmax(-1)).clamp_min(LOGPROB_FLOOR)
            assert lp == pytest.approx(float(want[token]), abs=1e-4)
            assert [v for _, v in top] == pytest.approx(want.topk(3).values.tolist(), abs=1e-4)


def test_logit_bias_and_penalties(model_tok):
    from frugallm.infer.sampling import adjust

    model, tok = model_tok
    prompt = _prompts(tok)[0]
    forced = tok.encode(" cat")[0]
    r = _run(model, tok, [dict(prompt=prompt, max_tokens=6, temperature=0.0, logit_bias={forced: 100.0})], slots=1)
    assert r[0]["text"] == tok.decode([forced] * 6)
    first = tok.encode(_run(model, tok, [dict(prompt=prompt, max_tokens=1, temperature=0.0)], slots=1)[0]["text"])[0]
    banned = _run(model, tok, [dict(prompt=prompt, max_tokens=1, temperature=0.0, logit_bias={first: -100.0})],
                  slots=1)[0]["text"]
    assert tok.encode(banned)[0] != first
    logits, counts = torch.randn(50), torch.zeros(50)
    counts[[3, 7]] = torch.tensor([1.0, 4.0])
    out = adjust(logits, counts, presence=0.5, frequency=0.25, bias=(torch.tensor([9]), torch.tensor([-2.0])))
    want = logits.clone()
    want[3] -= 0.5 + 0.25
    want[7] -= 0.5 + 1.0
    want[9] -= 2.0
    assert torch.equal(out, want)
    # a strong frequency penalty keeps greedy decoding from repeating itself as much
    plain = _run(model, tok, [dict(prompt=prompt, max_tokens=30, temperature=0.0)], slots=1)[0]["text"]
    penalised = _run(model, tok, [dict(prompt=prompt, max_tokens=30, temperature=0.0, frequency_penalty=2.0)],
                     slots=1)[0]["text"]
    assert len(set(tok.encode(penalised))) > len(set(tok.encode(plain)))


@pytest.fixture(scope="module")
def server(tiny_run):
    with serve_process(tiny_run, KEY, "--model-name", "tiny", "--dtype", "float32", "--slots", "8") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def test_openai_client_logprobs_n_and_echo(client, model_tok):
    model, tok = model_tok
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat"}],
                                          max_tokens=8, n=2, temperature=0.9, seed=5, logprobs=True, top_logprobs=2)
    assert [c.index for c in chat.choices] == [0, 1]
    for c in chat.choices:
        content = c.logprobs.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
        text = bytes(b for t in content for b in t.bytes).decode("utf-8", errors="replace")
        assert text == c.message.content or c.finish_reason == "stop"
    single = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat"}],
                                            max_tokens=8, temperature=0.9, seed=5)
    assert single.choices[0].message.content == chat.choices[0].message.content  # choice i samples with seed + i
    assert chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat.choices) or any(
        c.finish_reason == "stop" for c in chat.choices)

    prompts = [_prompts(tok)[0], _prompts(tok)[2]]
    echo = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=1,
                                     temperature=0)
    assert [c.index for c in echo.choices] == [0, 1] and echo.usage.prompt_tokens == sum(map(len, prompts))
    for c, p in zip(echo.choices, prompts):
        lp = c.logprobs
        assert c.text == tok.decode(p) and lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(p)
        with torch.no_grad():
            want = model(torch.tensor([p])).logits[0].float().log_softmax(-1)
        for i in range(1, len(p)):
            assert lp.token_logprobs[i] == pytest.approx(float(want[i - 1, p[i]]), abs=1e-4)
            assert max(lp.top_logprobs[i].values()) == pytest.approx(float(want[i - 1].max()), abs=1e-4)
    two = client.completions.create(model="tiny", prompt="the dog", max_tokens=5, n=2, temperature=1.0, seed=1)
    assert len(two.choices) == 2 and two.usage.prompt_tokens == len(tok.encode("the dog")) + 1


def test_streamed_choices_with_logprobs_equal_the_reply(client):
    args = dict(model="tiny", messages=[{"role": "user", "content": "a dog"}], max_tokens=10, n=2, temperature=1.0,
                seed=11, logprobs=True, top_logprobs=1)
    reply = client.chat.completions.create(**args)
    text, records = ["", ""], [[], []]
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            records[c.index] += c.logprobs.content if c.logprobs else []
    assert text == [c.message.content for c in reply.choices]
    assert [[t.logprob for t in r] for r in records] == [[t.logprob for t in c.logprobs.content]
                                                         for c in reply.choices]


def test_metrics_in_prometheus_format(client, server):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="tiny", prompt="the cat", max_tokens=4)
    request = urllib.request.Request(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    samples = [s for f in families.values() for s in f.samples]
    value = lambda name, **labels: sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())
    assert families["frugallm_requests"].type == "counter"
    assert value("frugallm_requests_total", route="/v1/completions", status="200") >= 1
    assert value("frugallm_decode_tokens_total") >= 3 and value("frugallm_prefill_tokens_total") >= 2
    assert families["frugallm_time_to_first_token_seconds"].type == "histogram"
    assert value("frugallm_time_to_first_token_seconds_count") >= 1
    assert value("frugallm_inter_token_latency_seconds_count") >= 3
    assert value("frugallm_queue_depth") == 0 and value("frugallm_cache_tokens_budget") > 0
    for name in ("frugallm_running_requests", "frugallm_cache_usage_ratio", "frugallm_decode_tokens_per_second",
                 "frugallm_prefill_tokens_per_second"):
        assert name in families
    with pytest.raises(urllib.error.HTTPError) as e:  # the key guards it like every route
        urllib.request.urlopen(server + "/metrics")
    assert e.value.code == 401
    assert json.loads(e.value.read())["error"]["code"] == "invalid_api_key"


def test_a_client_hanging_up_mid_batch_over_http(client, server, model_tok):
    """Three greedy streams at once; one client closes its connection after two chunks: the other two get the
    text they get alone, and the server frees the abandoned request."""
    import http.client
    import threading
    import time

    _, tok = model_tok
    bodies = [dict(model="tiny", prompt=f"the {w}", max_tokens=40, temperature=0, logit_bias={str(tok.eos_id): -100})
              for w in ("cat", "dog ran", "ball and the")]
    alone = [client.completions.create(**b).choices[0].text for b in bodies]
    texts = [""] * 3

    def stream(i: int):
        conn = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({**bodies[i], "stream": True}),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response, chunks = conn.getresponse(), 0
        for line in response:
            if line.startswith(b"data: {"):
                texts[i] += json.loads(line[6:])["choices"][0]["text"]
                chunks += 1
                if i == 1 and chunks == 2:
                    break
        conn.sock.close()  # for i == 1: hang up mid-stream
        conn.close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert texts[0] == alone[0] and texts[2] == alone[2] and len(texts[1]) < len(alone[1])
    health = urllib.request.Request(server + "/health", headers={"Authorization": f"Bearer {KEY}"})
    for _ in range(50):
        with urllib.request.urlopen(health) as r:
            load = json.loads(r.read())
        if load["active"] == load["queued"] == 0:
            break
        time.sleep(0.1)
    assert load["active"] == load["queued"] == load["cache_tokens_reserved"] == 0
