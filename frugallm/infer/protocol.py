"""The OpenAI wire protocol as this server speaks it: request bodies, their strict parsing, and errors.

Bodies are pydantic models in strict mode ("5" is not a number, true is not an int). An unknown field
gets OpenAI's answer to an unrecognised argument, a 400 "Unrecognized request argument supplied: NAME"
(a typo such as "max_token" would otherwise pass silently). `parse` reads a body itself, within a size limit, and turns the first validation error into
OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with `param` the field's path
("messages[0].content"). The same models describe the bodies in the app's OpenAPI schema
(`add_request_schemas`), so clients and fuzzers see what `parse` accepts.
"""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import access

log = logging.getLogger("frugallm.server")
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/docs",
          "/openapi.json", "/redoc"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request bodies
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None  # chat: a boolean; completions: how many alternatives (0-20)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    user: str | None = None  # OpenAI's end-user id for abuse monitoring: accepted, unused


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # OpenAI's participant name: accepted, not shown to the model


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None  # refused when given (server.py): OpenAI's names, so not "unrecognized"
    tool_choice: str | dict | None = None
    response_format: dict | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


async def parse(request: Request, schema: type[_Strict], limit: int) -> _Strict:
    """The request's JSON body as `schema`, or an APIError: 413 past `limit` bytes, 400 naming the bad field."""
    too_big = APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                       code="request_too_large")
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise too_big
    raw = bytearray()
    async for part in request.stream():  # never more than `limit` bytes in memory
        raw += part
        if len(raw) > limit:
            raise too_big
    try:
        body = json.loads(raw)
        json.dumps(body, ensure_ascii=False).encode()  # lone surrogates ("\ud800") decode but are not text
    except json.JSONDecodeError as e:
        raise APIError(400, f"The request body is not valid JSON: {e}") from None
    except (UnicodeError, RecursionError):
        raise APIError(400, "The request body is not valid JSON text: invalid UTF-8, a lone surrogate, "
                       "or nested too deep") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, not {type(body).__name__}")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "extra_forbidden":  # OpenAI's wording, with the field's path as the param
            *path, field = err["loc"]
            name = _param((*(q for q in path if isinstance(q, int) or q in _FIELDS), field))
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                           code="unrecognized_argument") from None
        # keep list indices and field names; drop pydantic's union-branch tags ("str", "list[int]")
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or p in _FIELDS)
        name = _param(loc) or None
        raise APIError(400, f"Invalid value for '{name}': {err['msg']}" if err["type"] != "missing"
                       else f"Missing required parameter: '{name}'", param=name,
                       code="missing_required_parameter" if err["type"] == "missing" else "invalid_type") from None


_FIELDS = {name for schema in (StreamOptions, TextPart, Message, ChatRequest, CompletionRequest)
           for name in schema.model_fields}


def internal(rid: str) -> APIError:
    """What a client sees of an internal error: the request id to find it in the log, nothing more."""
    return APIError(500, f"internal error, see the server log (request id {rid})", type="server_error",
                    code="internal_error")


def reply(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)



def body_schema(schema: str) -> dict:
    """openapi_extra for a route whose JSON body `_parse` checks by hand."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema}"}}}}}


def add_request_schemas(spec: dict, model_name: str) -> dict:
    """Put ChatRequest and CompletionRequest (with `model` the one served) into an OpenAPI spec's components."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ChatRequest, CompletionRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schema["properties"]["model"] = {"type": "string", "enum": [model_name]}
        schemas[model.__name__] = schema
    return spec


# --- log-probs in OpenAI's two shapes
MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default max_logprobs


def completion_logprobs(entries: list, token: "callable", offset: int = 0, top: bool = True,
                        width: "callable" = None) -> dict:
    """The legacy completions shape: {tokens, token_logprobs, top_logprobs, text_offset} for records
    (id, log-prob or None, [(id, log-prob)]); token(id) -> (text, bytes). `offset`: the text before them.
    width(id): the characters the token adds to the reply's `text` (default: its own text's length); a
    control token such as <|bos|> is listed under `tokens` but adds none, as decoding skips it."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, lp, alternatives in entries:
        text = token(i)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({token(a)[0]: v for a, v in alternatives} if top and lp is not None else None)
        out["text_offset"].append(offset)
        offset += len(text) if width is None else width(i)
    return out


def chat_logprobs(entries: list, token: "callable") -> dict:
    """The chat shape: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal}."""
    def one(i, lp):
        text, raw = token(i)
        return {"token": text, "logprob": lp, "bytes": raw}
    return {"content": [{**one(i, lp), "top_logprobs": [one(a, v) for a, v in alternatives]}
                        for i, lp, alternatives in entries], "refusal": None}


# --- replies
def failure(event: tuple, rid: str, timeout: float) -> APIError:
    """The error for an engine event that is not text: a timeout (503), a disconnect, or an internal error."""
    if event[0] == "timeout":
        return APIError(503, f"The request did not finish within this server's timeout of {timeout:g}"
                        f" s (--request-timeout); retry later or ask for fewer tokens.", type="server_error",
                        code="timeout", headers={"Retry-After": "1"})
    if event[0] == "cancelled":
        return APIError(400, "the client disconnected")  # nobody reads it
    return internal(rid)  # the engine logged the detail


def total_usage(usage: list[dict | None], n: int) -> dict | None:
    """One request's usage: each prompt counted once (its n choices share it), every choice's completion."""
    if any(u is None for u in usage):
        return None
    prompt = sum(u["prompt_tokens"] for u in usage[::n])
    completion = sum(u["completion_tokens"] for u in usage)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# --- in front of every route
class Guard:
    """ASGI middleware in front of every route, /docs and /openapi.json included (FastAPI's dependencies
    skip those): gives the request an id, checks Host, Origin, the API key and a POST's Content-Type
    (`_refusal`), and turns whatever escapes the handlers into a generic 500 with the detail in the log."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = scope.setdefault("state", {})["rid"] = uuid.uuid4().hex
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values
                self.server.metrics.request(route, message["status"])
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        refused = self._refusal(scope)
        if refused is not None:
            return await reply(refused)(scope, receive, send_with_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed", rid)
            if started:  # too late for a status: the connection just closes
                raise
            await reply(internal(rid))(scope, receive, send_with_id)

    def _refusal(self, scope) -> APIError | None:
        """The first check a request fails (access.py): its Host (keyless servers only: a key already keeps
        a rebound page out), its Origin, the API key, a POST body's Content-Type; None when it passes."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, key = headers.get("host"), self.server.api_key
        if key is None and not access.host_ok(host, self.server.allowed_hosts):
            return APIError(400, f"This server does not answer for the host name {host!r} (a web page could be "
                            f"driving it through DNS rebinding); add it with --allowed-hosts, or use 127.0.0.1.",
                            param="Host", code="invalid_host")
        if not access.origin_ok(headers.get("origin"), host):
            return APIError(403, f"Requests from the web page at {headers.get('origin')!r} are refused: only "
                            f"this server's own chat page may call it from a browser.", param="Origin",
                            code="forbidden_origin")
        if scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            key = None  # the chat page is static and holds nothing; its own API calls send the key
        given = headers.get("authorization", "").encode("latin-1")
        if key is not None and not secrets.compare_digest(given, f"Bearer {key}".encode()):
            return APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'.",
                            code="invalid_api_key")
        if scope["method"] == "POST" and not access.json_body(headers.get("content-type")):
            return APIError(415, f"The request body must be JSON, sent with 'Content-Type: application/json'; "
                            f"got {headers.get('content-type')!r}.", param="Content-Type",
                            code="unsupported_media_type")
        return None
