"""What a web page, a hostile checkpoint or an odd request can do to `frugallm serve` (issue 25 items 6-9).

The server runs in this process under uvicorn on a thread (a real HTTP server on a free loopback port, no key
unless a test gives one), over the session's tiny run. Requests go through http.client, which lets a test set
Host, Origin and Content-Type as a browser or an attacker's page would.
"""

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

NAME = "tiny-access"


@contextlib.contextmanager
def served(model, tokenizer, **options):
    """Server(model, tokenizer) under uvicorn on a thread; yields its port."""
    from frugallm.infer.server import Server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = Server(model, tokenizer, NAME, slots=2, **options).app
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def call(port: int, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 30):
    """(status, payload): JSON, or for a stream the list of its `data:` payloads."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", **(headers or {})}
        raw = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.putrequest(method, path, skip_host="Host" in headers)
        for k, v in {**headers, "Content-Length": str(len(raw or b""))}.items():
            if v is not None:
                conn.putheader(k, v)
        conn.endheaders(raw)
        r = conn.getresponse()
        data = r.read()
        if r.getheader("content-type", "").startswith("text/event-stream"):
            return r.status, [line[6:].decode() for line in data.split(b"\n") if line.startswith(b"data: ")]
        return r.status, json.loads(data)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_run):
    from frugallm import load, load_tokenizer

    return load(tiny_run), load_tokenizer(tiny_run)


@pytest.fixture(scope="module")
def keyless(model_and_tokenizer):
    with served(*model_and_tokenizer, allowed_hosts=("llm.lan",)) as port:
        yield port


def _completion(**kw) -> dict:
    return {"model": NAME, "prompt": "the cat", "max_tokens": 2, "temperature": 0, **kw}


# --- 25.6: a web page cannot drive a keyless server
def test_a_web_page_cannot_drive_a_keyless_server(keyless):
    port = keyless
    here = f"127.0.0.1:{port}"
    # what the repro sent: a rebinding name, a foreign page, a CORS-safe body type
    for headers, status, code in [
            ({"Host": f"evil.example:{port}"}, 400, "invalid_host"),
            ({"Origin": "http://evil.example"}, 403, "forbidden_origin"),
            ({"Origin": "null"}, 403, "forbidden_origin"),
            ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
            ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
            ({"Content-Type": None}, 415, "unsupported_media_type")]:
        got, body = call(port, "POST", "/v1/completions", _completion(), headers)
        assert (got, body["error"]["code"]) == (status, code), headers
        assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = call(port, "GET", "/health", headers={"Host": f"evil.example:{port}"})
    assert status == 400 and "--allowed-hosts" in body["error"]["message"]  # no reading /health or /metrics
    # the server's own names, IP literals, --allowed-hosts, and the chat page's own origin pass
    for headers in [{}, {"Host": f"localhost:{port}"}, {"Host": f"[::1]:{port}"}, {"Host": f"llm.lan:{port}"},
                    {"Host": f"LLM.LAN:{port}"}, {"Origin": f"http://{here}"},
                    {"Content-Type": "application/json; charset=utf-8"}]:
        status, body = call(port, "POST", "/v1/completions", _completion(), headers)
        assert status == 200 and body["choices"][0]["text"] is not None, (headers, body)


def test_a_key_lets_any_host_name_through(model_and_tokenizer):
    """With a key, a rebound page cannot send it (it lives in another origin's storage): names behind a proxy
    keep working; a foreign Origin and text/plain are refused all the same."""
    with served(*model_and_tokenizer, api_key="k") as port:
        auth = {"Authorization": "Bearer k"}
        assert call(port, "GET", "/health", headers={**auth, "Host": "llm.example.com"})[0] == 200
        status, body = call(port, "POST", "/v1/completions", _completion(), {**auth, "Origin": "https://x.example"})
        assert status == 403


def test_api_key_file_and_environment(tmp_path, monkeypatch):
    from frugallm.infer.access import api_key_from

    monkeypatch.delenv("FRUGALLM_API_KEY", raising=False)
    assert api_key_from() is None
    monkeypatch.setenv("FRUGALLM_API_KEY", "from-env")
    assert api_key_from() == "from-env" and api_key_from("flag") == "flag"
    (tmp_path / "key").write_text("from-file\n")
    assert api_key_from(api_key_file=str(tmp_path / "key")) == "from-file"
    (tmp_path / "two").write_text("a\nb\n")
    with pytest.raises(ValueError, match="alone on one line"):
        api_key_from(api_key_file=str(tmp_path / "two"))
    # through the CLI: bad input is one line naming the fix, before the model loads
    r = subprocess.run([sys.executable, "-m", "frugallm.cli", "serve", str(tmp_path), "--api-key-file",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot read the API key file" in r.stderr
    # a key from the environment lets a non-loopback host start (InsecureServe is checked first)
    from frugallm.infer.access import check_exposure

    check_exposure("0.0.0.0", api_key_from())


# --- 31.4: what the server does not do is refused
def test_unknown_fields_and_response_format_are_refused(keyless):
    status, body = call(keyless, "POST", "/v1/completions", _completion(foo=1))
    assert status == 400 and body["error"]["message"] == "Unrecognized request argument supplied: foo"
    assert body["error"]["param"] == "foo" and body["error"]["type"] == "invalid_request_error"
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi", "name": "ann"}], "max_tokens": 2,
            "user": "u-1"}
    assert call(keyless, "POST", "/v1/chat/completions", chat)[0] == 200  # OpenAI's own optional fields pass
    status, body = call(keyless, "POST", "/v1/chat/completions",
                        {**chat, "messages": [{"role": "user", "content": "hi", "nmae": "ann"}]})
    assert status == 400 and body["error"]["param"] == "messages[0].nmae"
    status, body = call(keyless, "POST", "/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}})
    assert status == 400 and body["error"]["param"] == "response_format"
    status, body = call(keyless, "POST", "/v1/completions", _completion(stream_options={"include_usage": True,
                                                                                        "x": 1}))
    assert status == 400 and body["error"]["param"] == "stream_options.x"


def test_echo_offsets_do_not_count_bos(keyless, model_and_tokenizer):
    text = "the cat sat\non the mat"
    for stream in (False, True):
        status, body = call(keyless, "POST", "/v1/completions", _completion(prompt=text, echo=True, logprobs=0,
                                                                            max_tokens=3, stream=stream))
        assert status == 200
        if stream:
            chunks = [json.loads(e) for e in body if e != "[DONE]"]
            full = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            lp = {k: sum((c["choices"][0]["logprobs"][k] for c in chunks if c["choices"]
                          and c["choices"][0]["logprobs"]), []) for k in ("tokens", "text_offset")}
        else:
            full, lp = body["choices"][0]["text"], body["choices"][0]["logprobs"]
        assert full.startswith(text) and lp["tokens"][0] == "<|bos|>" and lp["text_offset"][:2] == [0, 0]
        for token, offset in zip(lp["tokens"][1:], lp["text_offset"][1:]):
            assert full[offset:offset + len(token)] == token, (token, offset, lp)


# --- 25.9: request checks that were 500s
def test_odd_numbers_get_400_or_an_answer(keyless):
    status, body = call(keyless, "POST", "/v1/completions", _completion(logit_bias={"²": 1}))
    assert status == 400 and body["error"]["param"] == "logit_bias"
    status, body = call(keyless, "POST", "/v1/completions", _completion(seed=2**64 - 1, n=2, temperature=1))
    assert status == 200 and len(body["choices"]) == 2
    one = call(keyless, "POST", "/v1/completions", _completion(seed=2**64 - 1, temperature=1, max_tokens=4))[1]
    two = call(keyless, "POST", "/v1/completions", _completion(seed=2**64 - 1, n=2, temperature=1, max_tokens=4))[1]
    assert two["choices"][0]["text"] == one["choices"][0]["text"]  # choice 0 is still the n=1 reply


def test_generate_refuses_a_nan_temperature(tiny_run):
    r = subprocess.run([sys.executable, "-m", "frugallm.cli", "generate", str(tiny_run), "--prompt", "a",
                        "--temperature", "nan"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--temperature: nan must be a finite number >= 0" in r.stderr
    assert "Traceback" not in r.stderr


# --- 25.8: a vocabulary larger than the tokenizer (a padded embedding)
@pytest.fixture(scope="module")
def padded(tiny_run):
    """The tiny run's weights in a model with 12 more vocabulary rows than its tokenizer has ids, whose head
    rows there are 3x the row of the greedy next token after "the cat", so that decoding names ids the
    tokenizer lacks."""
    import dataclasses

    import torch

    from frugallm import load, load_tokenizer
    from frugallm.model import Transformer

    small, tok = load(tiny_run), load_tokenizer(tiny_run)
    V = tok.vocab_size
    model = Transformer(dataclasses.replace(small.config, vocab_size=V + 12)).eval()
    state = model.state_dict()
    for name, value in small.state_dict().items():
        if state[name].shape == value.shape:
            state[name].copy_(value)
        else:  # embed and head (and MTP's): the first V rows are the run's
            state[name][:V].copy_(value)
    with torch.no_grad():
        following = small(torch.tensor([[tok.bos_id, *tok.encode("the cat")]])).logits[0, -1].argmax()
        model.head.weight[V:] = model.head.weight[following] * 3
    with served(model, tok) as port:
        yield port, V


def test_ids_past_the_tokenizer_are_400_or_empty_text(padded):
    port, V = padded
    status, body = call(port, "POST", "/v1/completions", _completion(prompt=[1, V + 3], echo=True, logprobs=1))
    assert status == 400 and body["error"]["param"] == "prompt" and f"[0, {V})" in body["error"]["message"]
    status, body = call(port, "POST", "/v1/completions", _completion(logit_bias={str(V + 3): 5}))
    assert status == 400 and body["error"]["param"] == "logit_bias"
    # the model itself names such ids: they read as empty text, in the reply and its log-probs
    for stream in (False, True):
        status, body = call(port, "POST", "/v1/completions", _completion(logprobs=3, max_tokens=4, stream=stream))
        assert status == 200, body
        if stream:
            assert body[-1] == "[DONE]" and not any("error" in e for e in body[:-1])
            choices = [json.loads(e)["choices"][0] for e in body[:-1]]
            tokens = sum((c["logprobs"]["tokens"] for c in choices if c["logprobs"]), [])
        else:
            tokens = body["choices"][0]["logprobs"]["tokens"]
        assert tokens[0] == "" and len(tokens) == 4


def test_a_stream_that_fails_ends_with_an_error_event_and_done(model_and_tokenizer):
    """Whatever fails after the headers are sent, the client sees an error event, then [DONE]."""
    import asyncio

    from frugallm.infer.engine import Job
    from frugallm.infer.server import Server

    server = Server(*model_and_tokenizer, NAME)
    job = Job([1], 4, logprobs=0)

    async def events():  # a record that cannot be rendered: the chunk fails mid-stream
        yield 0, ("text", "b", [("not an id", None, [])])

    async def read():
        head = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": NAME}
        gen = server._sse((0, ("text", "a", [])), events(), head, False, False, "rid-1", [job], [], 1)
        return [part async for part in gen]

    parts = asyncio.run(read())
    assert parts[-1] == "data: [DONE]\n\n" and '"code":"internal_error"' in parts[-2] and "rid-1" in parts[-2]


# --- 25.7: a chat template and large bodies do not hold the event loop
HOSTILE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ bos_token }}"


def test_a_hostile_chat_template_is_bounded_and_off_the_loop(model_and_tokenizer):
    from frugallm.tokenizer import Tokenizer

    model, tok = model_and_tokenizer
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for template, code in [(HOSTILE, "chat_template_timeout"), ("{{ 'ab' * 2000000000 }}", None),
                           ("{{ messages[0]['content'] }}{{ 1 + 'x' }}", None)]:
        hostile = Tokenizer(tok.tok, chat_template=template)
        with served(model, hostile, template_timeout=1.0) as port:
            result = {}
            worker = threading.Thread(target=lambda: result.update(r=call(port, "POST", "/v1/chat/completions",
                                                                           chat, timeout=60)))
            worker.start()
            time.sleep(0.3)
            assert call(port, "GET", "/health", timeout=10)[0] == 200  # the loop answers while it renders
            worker.join(60)
            status, body = result["r"]
            assert status == 400 and body["error"]["param"] == "messages", body
            assert code is None or body["error"]["code"] == code
            assert call(port, "POST", "/v1/completions", _completion())[0] == 200  # and it still serves


def test_a_huge_prompt_is_refused_before_it_is_encoded(keyless):
    status, body = call(keyless, "POST", "/v1/completions", _completion(prompt="the cat " * 130_000))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "characters" in body["error"]["message"]  # refused by its length, not after encoding a MiB
    status, body = call(keyless, "POST", "/v1/chat/completions",
                        {"model": NAME, "messages": [{"role": "user", "content": "the cat " * 130_000}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
