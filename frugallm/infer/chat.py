"""`frugallm chat RUN`: an interactive REPL over the chat template, streaming each reply as it comes.

The whole conversation (an optional system prompt, then user/assistant turns) is re-encoded every
turn as tokenizer.encode_chat(messages): contents as plain text, so typed control tokens stay text.
When it would not leave room for a reply in the model's context, the oldest turns are dropped (and
the user is told). Input and output are injectable, so
tests drive it with a list of lines and a StringIO.

Commands: /reset clears the history, /system TEXT sets the system prompt, /exit or /quit leaves,
/help lists them. Ctrl-D leaves; Ctrl-C stops a reply midway (what came so far stays in the history).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from .generate import generate_stream

HELP = "commands: /reset (clear the history), /system TEXT (set the system prompt), /exit, /help; Ctrl-D exits"


class Conversation:
    """Messages and their encoding, fitted to the context by dropping the oldest turns."""

    def __init__(self, tokenizer, context: int, system: str | None = None):
        self.tokenizer, self.context, self.system = tokenizer, context, system
        self.turns: list[dict[str, str]] = []  # user, assistant, user, assistant, ...

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def encode(self) -> list[int]:
        return self.tokenizer.encode_chat(self.messages())

    def fit(self, reserve: int) -> tuple[list[int], int]:
        """Drop the oldest user/assistant pairs until the prompt leaves `reserve` tokens for the reply.

        Returns the prompt ids and how many messages were dropped. The latest user message is never
        dropped: if it alone leaves no room, nothing is dropped and the caller gets the too-long prompt."""
        dropped = 0
        ids = self.encode()
        if len(ids) + reserve > self.context:
            alone = Conversation(self.tokenizer, self.context, self.system)
            alone.turns = self.turns[-1:]
            if len(alone.encode()) >= self.context:
                return alone.encode(), 0
        while len(ids) + reserve > self.context and len(self.turns) > 1:
            n = min(2, len(self.turns) - 1)
            del self.turns[:n]
            dropped += n
            ids = self.encode()
        return ids, dropped


def chat_repl(model, tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.8,
              top_k: int | None = None, top_p: float | None = None, seed: int | None = None, speculative: bool = False,
              input_fn: Callable[[str], str] = input, out: TextIO = sys.stdout, decoder=None) -> int:
    """Run the REPL until /exit or end of input; returns 0. decoder: as for `generate`."""
    context = model.config.max_seq_len
    convo = Conversation(tokenizer, context, system)
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else None
    reserve = min(max_new_tokens, context // 2)  # the room kept for a reply when old turns must go
    say = lambda s="", end="\n": (out.write(s + end), out.flush())
    say(f"frugallm chat: {context}-token context, up to {max_new_tokens} tokens a reply. {HELP}")
    turn = 0
    while True:
        try:
            line = input_fn("> ")
        except EOFError:  # Ctrl-D
            say()
            return 0
        except KeyboardInterrupt:
            say()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/help":
            say(HELP)
            continue
        if text == "/reset":
            convo.turns.clear()
            say("(history cleared)")
            continue
        if text.startswith("/system"):
            convo.system = text[len("/system"):].strip() or None
            say(f"(system prompt {'set' if convo.system else 'cleared'}; history cleared)")
            convo.turns.clear()
            continue
        convo.turns.append({"role": "user", "content": line})
        ids, dropped = convo.fit(reserve)
        if dropped:
            say(f"(history truncated: dropped the {dropped} oldest messages to fit the {context}-token context)")
        room = context - len(ids)
        if room <= 0:
            convo.turns.pop()
            say(f"(that message is too long: {len(ids)} prompt tokens, the context holds {context}; not sent)")
            continue
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, speculative=speculative,
                        seed=None if seed is None else seed + turn, decoder=decoder)
        reply, n, t0 = _stream_reply(model, tokenizer, ids, min(max_new_tokens, room), sampling, stop, say)
        turn += 1
        convo.turns.append({"role": "assistant", "content": reply})
        rate = n / max(time.perf_counter() - t0, 1e-9)
        say(f"\n[{n} tokens, {rate:.1f} tokens/s]")


def _stream_reply(model, tokenizer, ids, max_new, sampling, stop, say):
    """Print the reply as it is generated; returns (text, tokens, start time). Ctrl-C stops it early."""
    text, parts, n, t0 = tokenizer.stream(), [], 0, time.perf_counter()
    gen = generate_stream(model, [ids], max_new, stop=stop, **sampling)

    def show(piece: str) -> None:
        if piece:
            parts.append(piece)
            say(piece, end="")

    try:
        for step in gen:
            tokens = step[0].tolist()
            ended = [i for i, t in enumerate(tokens) if stop and t in stop]
            tokens = tokens[:ended[0]] if ended else tokens
            n += len(tokens) + bool(ended)
            for token in tokens:
                show(text.push(token))
            if ended:
                break
    except KeyboardInterrupt:
        say(" [interrupted]", end="")
    finally:
        gen.close()
    show(text.flush())
    return "".join(parts), n, t0
