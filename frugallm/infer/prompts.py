"""Request text to token ids, off the server's event loop and within bounds (the server's prompts).

Two things stalled every stream before this: `tokenizers`' `encode` holds the GIL (a 1 MiB prompt stopped
the event loop for ~0.8 s, measured on a 2-core Zen 3), and a checkpoint's Jinja chat template ran on the
loop with no bound (nested `range`s, or `10 ** 10 ** 10`, never return). So:
- a text longer than context x the longest token's characters cannot fit the context whatever its
  encoding, and is refused before any encoding (400, context_length_exceeded);
- completions' prompts are encoded with `encode_batch`, which releases the GIL, in a worker thread;
- chat prompts without a Jinja template (frugallm's own: role ids around plain-text contents) are encoded
  in a worker thread, their contents capped as above;
- chat prompts with a checkpoint's template are rendered and encoded in a child process (`TemplateWorker`):
  killed and restarted past `timeout` seconds, its address space capped, its reply at most context + 1 ids.
  A thread could not be stopped, and a C-level operation (a huge power) would hold the GIL all along.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from .protocol import APIError

# The child: imports frugallm's tokenizer module (not the package root, which brings torch: ~4 s, ~300 MiB),
# loads the tokenizer from stdin's first line, caps its address space 1 GiB above what it holds then, and
# answers one JSON line per request line.
CHILD = r"""
import json, resource, sys, types
root = types.ModuleType("frugallm")
root.__path__ = [sys.argv[1]]
sys.modules["frugallm"] = root
from tokenizers import Tokenizer as HF
from frugallm.tokenizer import Tokenizer
spec = json.loads(sys.stdin.readline())
tok = Tokenizer(HF.from_str(spec["tokenizer"]), spec["bos"], spec["eos"], spec["template"])
with open("/proc/self/statm") as f:
    held = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (held + (1 << 30), resource.RLIM_INFINITY))
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    try:
        ids = tok.encode_chat(request["messages"])
        out = {"ids": ids[:request["max_ids"]], "n": len(ids)}
    except MemoryError:
        out = {"error": "the checkpoint's chat template needed more than 1 GiB to render these messages"}
    except RecursionError:
        out = {"error": "the checkpoint's chat template recursed too deep on these messages"}
    except Exception as e:  # a template's own TypeError, UndefinedError, ...: its fault, not the server's
        out = {"error": f"the checkpoint's chat template failed on these messages: {type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""


def _too_long(count: int, unit: str, context: int, param: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {context} tokens, but the prompt is {count} "
                    f"{unit}.", param=param, code="context_length_exceeded")


class TemplateWorker:
    """A checkpoint's chat template, rendered and encoded in a child process, one request at a time."""

    def __init__(self, tokenizer, timeout: float = 5.0, start_timeout: float = 60.0):
        self.spec = json.dumps({"tokenizer": tokenizer.to_str(), "bos": tokenizer.bos_token,
                                "eos": tokenizer.eos_token, "template": tokenizer.chat_template}) + "\n"
        self.timeout, self.start_timeout = timeout, start_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._lock: asyncio.Lock | None = None

    async def _start(self) -> None:
        package = str(Path(__file__).resolve().parent.parent)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, package, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 26)
        self._proc.stdin.write(self.spec.encode())
        await self._proc.stdin.drain()
        if await asyncio.wait_for(self._proc.stdout.readline(), self.start_timeout) != b"ready\n":
            raise RuntimeError("the chat template worker did not start (see the server log)")

    def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
        self._proc = None

    async def encode(self, messages: list[dict], max_ids: int) -> tuple[list[int], int]:
        """(at most max_ids of the prompt's ids, their full count), or an APIError (400) naming the problem."""
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            done = False
            try:
                if self._proc is None or self._proc.returncode is not None:
                    await self._start()
                self._proc.stdin.write((json.dumps({"messages": messages, "max_ids": max_ids}) + "\n").encode())
                await self._proc.stdin.drain()
                line = await asyncio.wait_for(self._proc.stdout.readline(), self.timeout)
                done = bool(line)
            except asyncio.TimeoutError:
                raise APIError(400, f"The checkpoint's chat template did not finish rendering these messages "
                               f"within {self.timeout:g} s; shorten them or use /v1/completions with a plain-text "
                               f"prompt.", param="messages", code="chat_template_timeout") from None
            finally:
                if not done:  # timed out, died, or the client left mid-request: its reply must not reach the next
                    self.close()
            reply = json.loads(line)
        if "error" in reply:
            raise APIError(400, reply["error"], param="messages")
        return reply["ids"], reply["n"]


class PromptEncoder:
    """The server's prompts to ids, each check a 400 that names the limit (module docstring)."""

    def __init__(self, tokenizer, context: int, template_timeout: float = 5.0):
        self.tokenizer, self.context = tokenizer, context
        # characters one token can stand for, at most: a byte-level piece's characters are its bytes, and
        # decoding never makes a piece longer, so len(text) <= tokens * longest
        longest = max((len(piece) for piece in tokenizer.tok.get_vocab()), default=1)
        self.max_chars = context * max(1, longest)
        self.templates = TemplateWorker(tokenizer, template_timeout) if tokenizer.chat_template else None

    def _cap(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens, and the prompt's "
                           f"{chars} characters cannot fit it (at most {self.max_chars}: the context times the "
                           f"longest token's characters).", param=param, code="context_length_exceeded")

    async def texts(self, texts: list[str], params: list[str]) -> list[list[int]]:
        """Completions' text prompts, each without bos."""
        for text, param in zip(texts, params):
            self._cap(len(text), param)
        return await asyncio.to_thread(self.tokenizer.encode_batch, texts) if texts else []

    async def chat(self, messages: list[dict]) -> list[int]:
        """A chat prompt through the checkpoint's template or frugallm's; ValueError's text as a 400."""
        self._cap(sum(len(m["content"]) for m in messages), "messages")
        if self.templates is not None:
            ids, n = await self.templates.encode(messages, self.context + 1)
            if n > self.context:
                raise _too_long(n, "tokens", self.context, "messages")
            return ids
        try:
            return await asyncio.to_thread(self.tokenizer.encode_chat, messages)
        except ValueError as e:  # no chat template for this vocabulary
            raise APIError(400, str(e), param="messages") from None

    def close(self) -> None:
        if self.templates is not None:
            self.templates.close()
