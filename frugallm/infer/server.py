"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the Engine's worker thread.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, and GET /health (load).
`stream: true` sends server-sent events in OpenAI's chunk shapes and ends with `data: [DONE]`. Usage counts:
a non-streamed reply carries `usage`; a stream carries it on its last chunk (the one with `finish_reason`),
and, when `stream_options.include_usage` is true, also in OpenAI's extra final chunk with empty `choices`.

Sampling: temperature (default 1), top_p, top_k (an extension, as in vLLM), seed, stop (up to 4 strings),
max_tokens (chat: the rest of the context by default; completions: 16), n=1 only. Errors are OpenAI-shaped,
{"error": {"message", "type", "param", "code"}}: 400 for malformed JSON, wrong types, a missing field,
max_tokens <= 0 or past the context, a prompt longer than the context, unsupported options (n > 1, logprobs,
tools, ...); 401 for a missing or wrong API key; 404 for an unknown model or route.
A client that disconnects is cancelled at once (see engine.py); requests beyond the slots wait in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Job


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request bodies (strict: "5" is not a number, true is not an int; unknown fields are ignored)
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


async def _parse(request: Request, schema: type[_Strict]) -> _Strict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, not {type(body).__name__}")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # keep list indices and field names; drop pydantic's union-branch tags ("str", "list[int]")
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or p in _FIELDS)
        name = _param(loc) or None
        raise APIError(400, f"Invalid value for '{name}': {err['msg']}" if err["type"] != "missing"
                       else f"Missing required parameter: '{name}'", param=name,
                       code="missing_required_parameter" if err["type"] == "missing" else "invalid_type") from None


_FIELDS = {name for schema in (StreamOptions, TextPart, Message, ChatRequest, CompletionRequest)
           for name in schema.model_fields}


class Server:
    """The app's state: model, tokenizer, engine, name, key; `app` is the FastAPI application."""

    def __init__(self, model, tokenizer, model_name: str, api_key: str | None = None, slots: int = 16,
                 speculative: bool = False, decoder=None):
        self.model, self.tokenizer, self.model_name, self.api_key = model, tokenizer, model_name, api_key
        self.context = model.config.max_seq_len
        self.created = int(time.time())
        self.engine: Engine | None = None
        self.app = self._build_app(slots, speculative, decoder)

    def _build_app(self, slots: int, speculative: bool, decoder) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.engine = Engine(self.model, self.tokenizer, slots, speculative, decoder)
            yield
            self.engine.close()

        app = FastAPI(title="frugallm", lifespan=lifespan, dependencies=[Depends(self._authorize)])
        app.add_exception_handler(APIError, lambda req, e: JSONResponse(e.body(), status_code=e.status))
        app.add_exception_handler(StarletteHTTPException, lambda req, e: JSONResponse(
            APIError(e.status_code, str(e.detail), code=None).body(), status_code=e.status_code))
        app.add_exception_handler(RequestValidationError, lambda req, e: JSONResponse(
            APIError(400, str(e.errors()[0]["msg"]) if e.errors() else "invalid request").body(), status_code=400))
        app.add_exception_handler(Exception, lambda req, e: JSONResponse(
            APIError(500, f"{type(e).__name__}: {e}", type="server_error").body(), status_code=500))
        app.get("/health")(self.health)
        app.get("/v1/models")(self.list_models)
        app.get("/v1/models/{model:path}")(self.get_model)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/v1/completions")(self.completions)
        return app

    async def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    # --- endpoints
    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "frugallm"}

    async def health(self) -> dict:
        """Liveness and load: requests generating now ("active") and waiting for a slot ("queued")."""
        return {"status": "ok", "model": self.model_name, **self.engine.load()}

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, model: str) -> dict:
        self._check_model(model)
        return self._model_card()

    async def chat_completions(self, request: Request):
        req = await _parse(request, ChatRequest)
        self._check_model(req.model)
        if req.tools:
            raise APIError(400, "tools are not supported", param="tools")
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        prompt = self._bos() + self.tokenizer.encode(self.tokenizer.chat(messages))
        max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
        job = self._job(req, prompt, max_tokens, "messages", default=None)
        return await self._respond(request, req, job, chat=True)

    async def completions(self, request: Request):
        req = await _parse(request, CompletionRequest)
        self._check_model(req.model)
        for name in ("echo", "suffix"):
            if getattr(req, name):
                raise APIError(400, f"'{name}' is not supported", param=name)
        if req.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", param="best_of")
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], (str, list)) \
            else [req.prompt]
        if len(prompts) != 1:
            raise APIError(400, f"one prompt per request is supported, got {len(prompts)}", param="prompt")
        prompt = prompts[0]
        if isinstance(prompt, str):
            prompt = self._bos() + self.tokenizer.encode(prompt)
        elif not prompt or not all(0 <= t < self.model.config.vocab_size for t in prompt):
            raise APIError(400, f"token ids must be a non-empty list in [0, {self.model.config.vocab_size})",
                           param="prompt")
        job = self._job(req, list(prompt), req.max_tokens, "prompt", default=16)
        return await self._respond(request, req, job, chat=False)

    # --- helpers
    def _bos(self) -> list[int]:
        return [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def _job(self, req: _Sampling, prompt: list[int], max_tokens: int | None, prompt_param: str,
             default: int | None) -> Job:
        """Check the request against the context and what is supported; a Job, or an APIError."""
        room = self.context - len(prompt)
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens, but the prompt is "
                           f"{len(prompt)} tokens.", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:  # default: `default` tokens, or the rest of the context
            max_tokens = room if default is None else min(default, room)
        if max_tokens <= 0:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens: the prompt's "
                           f"{len(prompt)} tokens plus max_tokens={max_tokens} exceed it (at most {room}).",
                           param="max_tokens", code="context_length_exceeded")
        if req.n not in (None, 1):
            raise APIError(400, f"only n=1 is supported, got n={req.n}", param="n")
        for name in ("logprobs", "presence_penalty", "frequency_penalty", "logit_bias"):
            if getattr(req, name):
                raise APIError(400, f"'{name}' is not supported", param=name)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"at most 4 stop sequences, got {len(stop)}", param="stop")
        return Job(prompt, max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                   top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=[s for s in stop if s])

    async def _events(self, job: Job):
        """The job's events from the engine; cancels the job if the consumer goes away."""
        self.engine.submit(job)
        try:
            while True:
                event = await job.queue.get()
                yield event
                if event[0] != "text":
                    return
        finally:
            self.engine.cancel(job)  # a no-op once it has finished; frees the slot at once if not

    async def _respond(self, request: Request, req: _Sampling, job: Job, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name}
        if req.stream:
            usage_chunk = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(job, head, chat, usage_chunk), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watch = asyncio.create_task(self._watch_disconnect(request, job))
        try:
            text, finish, usage = [], None, None
            async for event in self._events(job):
                if event[0] == "text":
                    text.append(event[1])
                elif event[0] == "done":
                    finish, usage = event[1], event[2]
                else:
                    raise APIError(500, event[1], type="server_error")
        finally:
            watch.cancel()
        text = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                   "logprobs": None, "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {**head, "choices": [choice], "usage": usage}

    async def _watch_disconnect(self, request: Request, job: Job) -> None:
        """For a non-streamed request: cancel the job when the client hangs up before the answer."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(job)
        job.queue.put_nowait(("error", "the client disconnected"))

    async def _sse(self, job: Job, head: dict, chat: bool, usage_chunk: bool):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(delta: str | None, finish=None, usage=None, role=False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return _event({**head, "choices": [choice], "usage": usage})

        if chat:
            yield chunk(None, role=True)
        async for event in self._events(job):
            if event[0] == "text":
                yield chunk(event[1])
            elif event[0] == "done":
                yield chunk(None, finish=event[1], usage=event[2])
                if usage_chunk:
                    yield _event({**head, "choices": [], "usage": event[2]})
            else:
                err = APIError(500, event[1], type="server_error")
                yield _event(err.body())
        yield "data: [DONE]\n\n"


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, slots: int = 16, speculative: bool = False, threads: int | None = None,
          log_level: str = "info", compile: bool = False, dtype="auto") -> None:
    """Load RUN (a frugallm run or a Hugging Face DeepSeek dir) and serve it until interrupted.
    compile: compile the decode step (infer/compiled.py) before listening. dtype: "auto" (the
    host profile's inference choice, host.py) or a dtype name."""
    import torch
    import uvicorn

    from .. import inference_dtype, load_for_inference, load_tokenizer
    from ..numerics.kernels import kernels_in_use
    from .compiled import compile_decode

    if threads:
        torch.set_num_threads(threads)
    print(f"frugallm: {inference_dtype(dtype).reason}", flush=True)
    model, tokenizer = load_for_inference(run, dtype, prepack=not compile), load_tokenizer(run)
    print(f"frugallm: matmul kernels: {kernels_in_use(model)}", flush=True)
    name = model_name or Path(run).resolve().name
    if speculative and model.config.n_mtp == 0:
        raise ValueError(f"--speculative drafts with MTP modules, and {run} has none (n_mtp=0)")
    if compile:
        print("frugallm: compiling the decode step ...", flush=True)
    decoder = compile_decode(model, warmup=True, speculative=speculative) if compile else None
    server = Server(model, tokenizer, name, api_key=api_key, slots=slots, speculative=speculative, decoder=decoder)
    print(f"frugallm: serving '{name}' ({model.config.max_seq_len}-token context, {slots} slots) "
          f"on http://{host}:{port}/v1{' with an API key' if api_key else ''}", flush=True)
    uvicorn.run(server.app, host=host, port=port, log_level=log_level)
