"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the Engine's worker thread.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health (load), GET /metrics
(Prometheus, metrics.py) and GET / (the chat page, static/chat.html). `stream: true` sends server-sent events
in OpenAI's chunk shapes (one choice per chunk, `index` naming it) and ends with `data: [DONE]`. Usage: a
non-streamed reply carries `usage`; a stream carries it on its last chunk, and, when
`stream_options.include_usage` is true, also in OpenAI's extra final chunk with empty `choices`. With n > 1,
each prompt's tokens count once and every choice's completion counts.

Options, with OpenAI's and vLLM's semantics: temperature (default 1; below 1e-6 greedy), top_p, top_k (vLLM's
extension), seed (choice i of n samples with seed + i, so choice 0 equals n=1), stop (up to 4 strings of up to
256 characters), max_tokens (chat: default_max_tokens; completions: 16; either cut to fit), n (1-16),
presence_penalty and frequency_penalty (-2..2, on the tokens generated so far), logit_bias (token id -> -100..100),
completions' list of prompts, `logprobs: k` (0-20) and `echo` (the prompt's text and, with logprobs, its
records, the first null; max_tokens 0 allowed), chat's `logprobs: true` + `top_logprobs: k`. Log-probs are those
of the distribution sampled from: after penalties, logit_bias, temperature, top-k and top-p (greedy: the softmax
at temperature 1); a token top-k/top-p excludes reports -9999, as vLLM does, since JSON has no -inf. Echoed
prompt log-probs are the model's own (raw) distribution.

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: 400 for malformed JSON, wrong
types, a missing field, max_tokens < 1 (< 0 with echo), prompt + max_tokens past the context or the cache budget
(the message names the limit), unsupported options (tools, response_format, suffix, best_of > 1), an
unknown field ("Unrecognized request argument supplied", as OpenAI), a keyless server's unknown Host name; 401
for a missing or wrong API key; 403 for a foreign Origin; 404 for an unknown model or route; 413 for a body over
1 MiB + 32 bytes per context token; 415 for a POST body not sent as application/json; 429 when the queue is
full. Every response carries an X-Request-Id header.

Limits, each a `serve` argument (CLI: --max-cache-tokens, --max-queue, --request-timeout, --default-max-tokens),
so that load or a hostile client degrades service instead of taking the host down:
- max_cache_tokens: the KV-cache budget of all requests together, in tokens. A request reserves len(prompt) +
  max_tokens of it while it runs and waits in the queue until that fits; one that never can gets a 400 naming
  the limit. Default: half the memory available once the model is loaded, over `bytes_per_token` (memory.py),
  at most `slots` full contexts.
- max_queue (64): requests waiting for a slot or for budget; one more gets 429 with `Retry-After: 1`.
- request_timeout (600 s): from arrival to the last token, queueing included. Past it the request is cancelled
  and its budget freed; before its first token it gets 503 (code "timeout", `Retry-After`). A stream sends its
  headers only with its first token, so a request that waited too long gets that 503 too; a stream that runs
  out of time later gets an error event (code "timeout") and `data: [DONE]`.
- default_max_tokens (1024): chat's max_tokens when the request gives none.
- prefill_chunk (256): prompts are read through the cache at most this many tokens a step, all new prompts
  in one forward (engine.py), so attention scores are (B, H, S, T) with B * S <= 256, never (1, H, T, T).
A client that disconnects is cancelled at once, queued or running, and its budget freed (see engine.py).

Memory: resident memory stays under `memory_budget` = the process's RSS with the model loaded + the cache
budget (max_cache_tokens * bytes_per_token) + the prefill transient of one chunk against the longest cache
+ 512 MiB for requests in flight and allocator slack. `serve` prints it; /health reports it with the RSS.

Security: the API key is checked on every route, /docs, /redoc, /openapi.json, /health and /metrics included (a
load balancer's probe and Prometheus send the key too), but the chat page itself: static, holding nothing, it asks
the user for the key and sends it with its own API calls; a Content-Security-Policy keeps it to this server.
`serve` refuses a non-loopback host without a key (`InsecureServe`) unless `insecure_no_api_key` is set. Web
pages cannot drive the server (access.py): a foreign Origin gets 403, a POST must be JSON, and a keyless server
answers only loopback names, IP literals, --host and --allowed-hosts (DNS rebinding). Prompts are encoded off
the event loop, a checkpoint's chat template in a child process with a time limit (prompts.py). An internal error answers 500 "internal error, see the server log
(request id ...)"; its detail goes to the log (logger "frugallm.server"), never to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Job
from .jobs import Limits, jobs_for, run_jobs
from .memory import bytes_per_token, default_cache_tokens, memory_budget, rss
from . import access
from .access import InsecureServe, api_key_from, check_exposure  # noqa: F401 (the API)
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .prompts import PromptEncoder
from .protocol import (MAX_LOGPROBS, APIError, ChatRequest, CompletionRequest, Guard, Sampling, add_request_schemas,
                       body_schema, chat_logprobs, completion_logprobs, failure, internal, log, parse, reply,
                       sse_event, total_usage)

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"


class Server:
    """The app's state: model, tokenizer, engine, name, key and limits; `app` is the FastAPI application."""

    def __init__(self, model, tokenizer, model_name: str, api_key: str | None = None, slots: int = 16,
                 decoder=None, max_cache_tokens: int | None = None, max_queue: int = 64,
                 request_timeout: float = 600.0, default_max_tokens: int = 1024, prefill_chunk: int = 256,
                 memory_budget: int | None = None, policy: str = "batch", host: str = "127.0.0.1",
                 allowed_hosts: tuple[str, ...] = (), template_timeout: float = 5.0):
        self.model, self.tokenizer, self.model_name, self.api_key = model, tokenizer, model_name, api_key or None
        self.allowed_hosts = access.allowed_hosts(host, allowed_hosts)  # keyless only (access.py)
        self.context = model.config.max_seq_len
        self.max_cache_tokens = max_cache_tokens or slots * self.context
        if request_timeout <= 0 or default_max_tokens < 1:
            raise ValueError(f"request_timeout={request_timeout} must be > 0, default_max_tokens={default_max_tokens} "
                             f">= 1")
        self.request_timeout, self.default_max_tokens = request_timeout, default_max_tokens
        self.max_body = (1 << 20) + 32 * self.context
        self.memory_budget = memory_budget
        self.created = int(time.time())
        # ids a request may name: those both the model and the tokenizer hold (a padded embedding has more)
        self.vocab = min(model.config.vocab_size, tokenizer.vocab_size)
        self.limits = Limits(self.context, self.max_cache_tokens, self.vocab, max(1, max_queue))
        self.prompts = PromptEncoder(tokenizer, self.context, template_timeout)
        self.engine: Engine | None = None
        self.metrics = Metrics(lambda: self.engine.queue_stats())
        self._tokens: dict[int, tuple[str, list[int]]] = {}  # token id -> (text, bytes), for log-probs
        self.app = self._build_app(dict(slots=slots, decoder=decoder, max_queue=max_queue, policy=policy,
                                        max_cache_tokens=self.max_cache_tokens, prefill_chunk=prefill_chunk,
                                        metrics=self.metrics))

    def _build_app(self, engine_args: dict) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.engine = Engine(self.model, self.tokenizer, **engine_args)
            yield
            self.engine.close()
            self.prompts.close()

        app = FastAPI(title="frugallm", lifespan=lifespan)
        app.add_middleware(Guard, server=self)
        app.add_exception_handler(APIError, lambda req, e: reply(e))
        app.add_exception_handler(StarletteHTTPException, lambda req, e: reply(
            APIError(e.status_code, str(e.detail), headers=e.headers)))
        app.add_exception_handler(RequestValidationError, lambda req, e: reply(
            APIError(400, str(e.errors()[0]["msg"]) if e.errors() else "invalid request")))
        app.get("/", include_in_schema=False)(self.chat_page)
        app.get("/health")(self.health)
        app.get("/metrics", include_in_schema=False)(self.prometheus)
        app.get("/v1/models")(self.list_models)
        app.get("/v1/models/{model:path}")(self.get_model)
        app.post("/v1/chat/completions", openapi_extra=body_schema("ChatRequest"))(self.chat_completions)
        app.post("/v1/completions", openapi_extra=body_schema("CompletionRequest"))(self.completions)
        app.openapi = lambda: self._openapi(app)
        return app

    def _openapi(self, app: FastAPI) -> dict:
        """FastAPI's schema, plus the request bodies that `parse` checks by hand (for clients and fuzzers)."""
        if app.openapi_schema is None:
            spec = add_request_schemas(get_openapi(title=app.title, version=app.version, routes=app.routes),
                                       self.model_name)
            spec["components"]["securitySchemes"] = {"key": {"type": "http", "scheme": "bearer"}}
            spec["security"] = [{"key": []}] if self.api_key else []
            app.openapi_schema = spec
        return app.openapi_schema

    # --- endpoints
    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "frugallm"}

    async def chat_page(self) -> HTMLResponse:
        """The chat page (static/chat.html): plain HTML and JavaScript, nothing fetched from elsewhere."""
        # the browser enforces what the page promises: its own inline code, and requests to this server only
        csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src 'self' data:; base-uri 'none'; form-action 'none'")
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": csp})

    async def prometheus(self) -> Response:
        """Prometheus' text format (metrics.py lists the series)."""
        return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    async def health(self) -> dict:
        """Liveness, load (requests generating now, "active", and waiting, "queued"; cache tokens reserved of
        the budget) and memory (resident now, and the budget it should stay under)."""
        return {"status": "ok", "model": self.model_name, **self.engine.queue_stats(),
                "request_timeout_s": self.request_timeout, "rss_bytes": rss("VmRSS"),
                "memory_budget_bytes": self.memory_budget}

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, model: str) -> dict:
        self._check_model(model)
        return self._model_card()

    async def chat_completions(self, request: Request):
        req = await parse(request, ChatRequest, self.max_body)
        self._check_model(req.model)
        for name in ("tools", "tool_choice", "response_format"):  # a 200 that ignores them would mislead
            if getattr(req, name) is not None and (name != "tools" or req.tools):
                raise APIError(400, f"'{name}' is not supported by this server (no tool calls, no JSON mode)",
                               param=name)
        if req.logprobs is not None and not isinstance(req.logprobs, bool):
            raise APIError(400, "chat's 'logprobs' is a boolean; ask for alternatives with 'top_logprobs'",
                           param="logprobs")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        prompt = await self.prompts.chat(messages)  # contents as plain text: no forged turns (prompts.py)
        max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
        jobs = jobs_for(req, [prompt], max_tokens, "messages", default=self.default_max_tokens,
                        logprobs=(req.top_logprobs or 0) if req.logprobs else None, limits=self.limits)
        return await self._respond(request, req, jobs, chat=True, echo=[])

    async def completions(self, request: Request):
        req = await parse(request, CompletionRequest, self.max_body)
        self._check_model(req.model)
        if req.suffix:
            raise APIError(400, "'suffix' is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", param="best_of")
        if isinstance(req.logprobs, bool) or not 0 <= (req.logprobs or 0) <= MAX_LOGPROBS:
            raise APIError(400, f"completions' 'logprobs' is the number of alternatives per token, an integer from 0 "
                           f"to {MAX_LOGPROBS}, got {req.logprobs!r}", param="logprobs")
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], (str, list)) \
            else [req.prompt]
        params = ["prompt" if len(prompts) == 1 else f"prompt[{i}]" for i in range(len(prompts))]
        for prompt, param in zip(prompts, params):
            if not isinstance(prompt, str) and not (prompt and all(0 <= t < self.vocab for t in prompt)):
                raise APIError(400, f"token ids must be a non-empty list in [0, {self.vocab}): ids the model and "
                               f"the tokenizer both hold", param=param)
        strings = [(p, q) for p, q in zip(prompts, params) if isinstance(p, str)]
        encoded = iter(await self.prompts.texts([p for p, _ in strings], [q for _, q in strings]))
        ids = [self._bos() + next(encoded) if isinstance(p, str) else list(p) for p in prompts]
        jobs = jobs_for(req, ids, req.max_tokens, "prompt", default=16, logprobs=req.logprobs, limits=self.limits,
                        echo=bool(req.echo))
        echo = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts] if req.echo else []
        return await self._respond(request, req, jobs, chat=False, echo=echo)

    # --- helpers
    def _bos(self) -> list[int]:
        return [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def _token(self, i: int) -> tuple[str, list[int]]:
        """(text, bytes) of token i; an id past the tokenizer (a padded embedding's row) is empty text."""
        if i not in self._tokens:
            self._tokens[i] = self.tokenizer.token(i) if i < self.tokenizer.vocab_size else ("", [])
        return self._tokens[i]

    def _width(self, i: int) -> int:
        """The characters token i adds to a reply's text: none for a control token (<|bos|>), which
        decoding skips, else its own text's."""
        return len(self._token(i)[0]) if i < self.tokenizer.vocab_size and self.tokenizer.decode([i]) else 0

    async def _respond(self, request: Request, req: Sampling, jobs: list[Job], chat: bool, echo: list[str]):
        """Run the jobs; a JSON reply, or server-sent events. echo: each prompt's text, for completions' echo."""
        rid = request.state.rid
        for job in jobs:
            job.rid = rid
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "object": "chat.completion" if chat
                else "text_completion", "created": int(time.time()), "model": self.model_name}
        events = run_jobs(self.engine, jobs, self.request_timeout)
        watch = asyncio.create_task(self._watch_disconnect(request, jobs))
        n = req.n or 1
        try:
            if req.stream:  # headers go with the first token, so a request that waited too long still gets 503
                first = await anext(events)
                if first[1][0] not in ("text", "done", "prompt"):
                    raise failure(first[1], rid, self.request_timeout)
                usage_chunk = bool(req.stream_options and req.stream_options.include_usage)
                return StreamingResponse(self._sse(first, events, head, chat, usage_chunk, rid, jobs, echo, n),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text = [[] for _ in jobs]
            entries = [[] for _ in jobs]
            finish = [None] * len(jobs)
            usage = [None] * len(jobs)
            async for i, event in events:
                if event[0] == "text":
                    text[i].append(event[1])
                    entries[i] += event[2]
                elif event[0] == "prompt":
                    entries[i] = event[1] + entries[i]
                elif event[0] == "done":
                    finish[i], usage[i] = event[1], event[2]
                else:
                    raise failure(event, rid, self.request_timeout)
        except BaseException:
            await events.aclose()
            raise
        finally:
            watch.cancel()  # a stream's disconnects are seen by its writes from here on
        choices = []
        for i, job in enumerate(jobs):
            body = "".join(text[i])
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": body, "refusal": None},
                                "logprobs": None if job.logprobs is None else chat_logprobs(entries[i], self._token),
                                "finish_reason": finish[i]})
            else:
                prefix = echo[i // n] if echo else ""
                logprobs = None if job.logprobs is None else completion_logprobs(
                    entries[i], self._token, top=job.logprobs > 0, width=self._width)
                choices.append({"index": i, "text": prefix + body, "logprobs": logprobs, "finish_reason": finish[i]})
        return {**head, "choices": choices, "usage": total_usage(usage, n)}

    async def _watch_disconnect(self, request: Request, jobs: list[Job]) -> None:
        """Until the answer (or a stream's first token): cancel the jobs when the client hangs up."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for job in jobs:
            self.engine.cancel(job)
            job.queue.put_nowait(("cancelled",))  # the first still being read ends the reply

    async def _sse(self, first: tuple, events, head: dict, chat: bool, usage_chunk: bool, rid: str, jobs: list[Job],
                   echo: list[str], n: int):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        usage = [None] * len(jobs)
        offsets = [0] * len(jobs)

        def chunk(i: int, delta: str | None, records=None, finish=None, role=False) -> str:
            wanted = jobs[i].logprobs is not None and records is not None
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                lp = chat_logprobs(records, self._token) if wanted else None
                choice = {"index": i, "delta": d, "logprobs": lp, "finish_reason": finish}
            else:
                lp = completion_logprobs(records, self._token, offsets[i], top=jobs[i].logprobs > 0,
                                         width=self._width) if wanted else None
                if lp:
                    offsets[i] += sum(self._width(r[0]) for r in records)
                choice = {"index": i, "text": delta or "", "logprobs": lp, "finish_reason": finish}
            done = finish is not None and all(u is not None for u in usage)
            return sse_event({**head, "choices": [choice], "usage": total_usage(usage, n) if done else None})

        try:
            if chat:
                for i in range(len(jobs)):
                    yield chunk(i, None, role=True)
            elif echo:
                for i in range(len(jobs)):
                    if not jobs[i].prompt_logprobs:  # else its "prompt" event brings the text
                        yield chunk(i, echo[i // n])
            i, event = first
            while True:
                if event[0] == "text":
                    yield chunk(i, event[1], event[2])
                elif event[0] == "prompt":
                    yield chunk(i, echo[i // n], event[1])
                elif event[0] == "done":
                    usage[i] = event[2]
                    yield chunk(i, None, finish=event[1])
                else:  # a timeout or an internal error mid-stream: an error event instead of the last chunk
                    yield sse_event(failure(event, rid, self.request_timeout).body())
                    break
                if all(u is not None for u in usage):
                    if usage_chunk:
                        yield sse_event({**head, "choices": [], "usage": total_usage(usage, n)})
                    break
                i, event = await anext(events)
        except Exception:  # headers are gone: the error can only be an event, and [DONE] still ends the stream
            log.exception("request %s failed mid-stream", rid)
            yield sse_event(internal(rid).body())
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, slots: int = 16, threads: int | None = None,
          log_level: str = "info", compile: bool | str | None = None, dtype="auto",
          max_cache_tokens: int | None = None,
          max_queue: int = 64, request_timeout: float = 600.0, default_max_tokens: int = 1024,
          prefill_chunk: int = 256, insecure_no_api_key: bool = False, policy: str = "batch",
          api_key_file: str | None = None, allowed_hosts: tuple[str, ...] = ()) -> None:
    """Load RUN (a frugallm run or a Hugging Face DeepSeek dir) and serve it until interrupted.
    policy: "batch" (continuous batching) or "round-robin" (one request per forward; engine.py).
    compile: "auto" (None: $FRUGALLM_COMPILE, else auto: where it works here), "on" / True or "off" /
    False: compile the decode step (kernels/compiled.py) before listening (plan.prepare_inference).
    dtype: "auto" (the host profile's inference choice, host.py) or a dtype name. The limits are in the
    module docstring; a non-loopback `host` needs `api_key` or `insecure_no_api_key` (else InsecureServe, before loading).
    The key: `api_key`, or `api_key_file`'s first line, or $FRUGALLM_API_KEY (access.api_key_from).
    allowed_hosts: Host names a keyless server answers besides loopback names, IP literals and `host`
    ("*": any; access.py says why it checks)."""
    api_key = api_key_from(api_key, api_key_file)
    check_exposure(host, api_key, insecure_no_api_key)
    import torch
    import uvicorn

    from ..formats.checkpoint import load_tokenizer
    from ..plan import prepare_inference

    # one core stays with the event loop (HTTP, JSON, streaming): on a 2-core Zen 4 (benchmarks/bench_serve.py)
    # one torch thread gave 103 vs 63 tok/s at 1 client and 560 vs 361 at 16 clients against two
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) - 1))
    print(f"frugallm: {torch.get_num_threads()} torch thread(s){'' if threads else ' (one core left for HTTP)'}",
          flush=True)
    # compile: batch 1 now; each larger power-of-two batch on first use (engine.py pads batches to them),
    # each announced on stderr by kernels/compiled.py ("compiling the decode step for batch 4, ...")
    applied, _ = prepare_inference(run, dtype, compile=compile,
                                   log=lambda line: print(f"frugallm: {line}", flush=True))
    model, decoder, tokenizer = applied.model, applied.decoder, load_tokenizer(run)
    name = model_name or Path(run).resolve().name
    max_cache_tokens = max_cache_tokens or default_cache_tokens(model, slots)
    budget = memory_budget(model, max_cache_tokens, prefill_chunk)
    server = Server(model, tokenizer, name, api_key=api_key, slots=slots, decoder=decoder,
                    max_cache_tokens=max_cache_tokens, max_queue=max_queue, request_timeout=request_timeout,
                    default_max_tokens=default_max_tokens, prefill_chunk=prefill_chunk, memory_budget=budget,
                    policy=policy, host=host, allowed_hosts=tuple(allowed_hosts or ()))
    per = bytes_per_token(model.config, model.embed.weight.dtype)
    print(f"frugallm: serving '{name}' ({model.config.max_seq_len}-token context, {slots} slots) "
          f"on http://{host}:{port}/v1{' with an API key' if api_key else ' WITHOUT an API key'}", flush=True)
    print(f"frugallm: limits: cache budget {max_cache_tokens} tokens ({max_cache_tokens * per / 2**30:.2f} GiB), "
          f"queue {max_queue}, timeout {request_timeout:g} s; memory budget {budget / 2**30:.2f} GiB "
          f"(resident now {(rss() or 0) / 2**30:.2f} GiB)", flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(server.app, host=host, port=port, log_level=log_level)
