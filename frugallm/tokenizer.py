"""Byte-level BPE tokenizers (Hugging Face `tokenizers`) with frugallm's special tokens and chat template.

Byte-level means every UTF-8 byte has a token, so any text encodes and decodes losslessly.
Special tokens: <|bos|> <|eos|> <|pad|> and the chat roles <|system|> <|user|> <|assistant|>.
A Hugging Face checkpoint's own tokenizer.json loads as is; its bos/eos and its Jinja chat template
come from tokenizer_config.json when present.

Text is always text. `encode` never turns a special token's literal text ("<|system|>" typed by a
user, or found in a training document) into its control id: it becomes ordinary byte tokens. Control
tokens enter a sequence only by id: the frugallm chat template appends role ids, and a Hugging Face
template is rendered with a placeholder for each message's content, so only the template's own text
is read for special tokens and each content is encoded as plain text in its place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
ROLES = ("system", "user", "assistant")
TOKENIZER = "tokenizer.json"  # the file name, in a run, a checkpoint or a Hugging Face directory
# frugallm's chat template as Jinja, for exports (`hf_config`): the same ids as encode_chat's own
# template, so a Hugging Face tokenizer, vLLM or lm-eval reading the export builds the same prompts
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}{% endif %}{% endfor %}"
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
# DeepSeek-V3.2's chat prompt in its non-thinking ("chat") mode, as Jinja. The release ships no template,
# only Python encoding scripts: bos, the system text as is, each user turn as <｜User｜>TEXT<｜Assistant｜>
# then </think> (closing an empty thought: answer directly), each reply as TEXT<｜end▁of▁sentence｜>. A
# final user turn is left open only with add_generation_prompt. Used where a checkpoint has no template
# but has these role tokens (load_tokenizer), and written into its exports' tokenizer_config.json.
DEEPSEEK_CHAT_TOKENS = ("<｜User｜>", "<｜Assistant｜>", "</think>")
DEEPSEEK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}{% endif %}{% endfor %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% if not loop.last or add_generation_prompt %}{{ '<｜Assistant｜></think>' }}{% endif %}"
    "{% else %}{{ message['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}")
# Bumped when the same tokenizer.json starts encoding some text differently (2: special tokens'
# literal text became plain text), so data caches keyed on `hash()` are rebuilt.
ENCODING_VERSION = 2


class Tokenizer:
    """A thin wrapper: encode/decode, special-token ids, chat prompts, a content hash, save/load."""

    def __init__(self, tok: _HFTokenizer, bos: str | None = "<|bos|>", eos: str | None = "<|eos|>",
                 chat_template: str | None = None):
        self.tok = tok
        tok.encode_special_tokens = True  # content is text: "<|eos|>" in it is 7 characters, not a token
        # the template's own text (HF templates only) is the one place special tokens are read from text
        self._template_tok = _HFTokenizer.from_str(tok.to_str())
        self._template_tok.encode_special_tokens = False
        self.bos_id = tok.token_to_id(bos) if bos else None
        self.eos_id = tok.token_to_id(eos) if eos else None
        self.pad_id = tok.token_to_id("<|pad|>")
        self.bos_token, self.eos_token = bos, eos
        self.chat_template = chat_template
        self._specials = {t.content for t in tok.get_added_tokens_decoder().values()}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, i: int) -> tuple[str, list[int]]:
        """One token's own text and bytes (a server's log-probs): byte-level pieces map back to their raw
        bytes, and a piece that is part of a character reads as U+FFFD; special tokens read as themselves."""
        piece = self.tok.id_to_token(i)
        if piece is None:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        if piece in self._specials or any(c not in _BYTE_OF for c in piece):
            raw = (piece if piece in self._specials else self.decode([i])).encode()
        else:
            raw = bytes(_BYTE_OF[c] for c in piece)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def stream(self) -> "TextStream":
        """An incremental detokenizer: push token ids as they come, get back only whole characters."""
        return TextStream(self)

    def to_str(self) -> str:
        return self.tok.to_str()

    def hash(self) -> str:
        """sha256 of the serialised tokenizer and how it encodes: data caches are keyed on it."""
        return hashlib.sha256(f"{ENCODING_VERSION}|{self.to_str()}".encode()).hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> Path:
        from .io import write_file

        return write_file(Path(directory) / TOKENIZER, self.to_str())

    def hf_config(self, model_max_length: int) -> dict:
        """tokenizer_config.json for a Hugging Face export: the special tokens and the chat template
        (the checkpoint's own, or frugallm's where the vocabulary has its role tokens), so that
        AutoTokenizer.from_pretrained and the servers built on it need no hand edits."""
        template = self.chat_template
        if template is None and all(self.tok.token_to_id(f"<|{r}|>") is not None for r in ROLES):
            template = CHAT_TEMPLATE
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                  "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": "<|pad|>" if self.pad_id is not None else self.eos_token,
                  "add_bos_token": self.bos_id is not None, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False}
        return config | ({"chat_template": template} if template else {})

    def hf_files(self, model_max_length: int) -> dict[str, str]:
        """{file name: text} of the tokenizer in a Hugging Face export: tokenizer.json, whose post-processor
        puts bos in front of a text as frugallm does (generate, serve, training documents all start with
        it), so `AutoTokenizer(text)` gives frugallm's ids; and tokenizer_config.json (hf_config). The
        post-processor lives in tokenizer.json because transformers 5 ignores add_bos_token there."""
        from tokenizers import processors

        tok = _HFTokenizer.from_str(self.to_str())
        adds_bos = tok.encode("a").ids[:1] == [self.bos_id]  # a checkpoint's own tokenizer may already
        if self.bos_id is not None and not adds_bos:  # frugallm's encode never runs it (add_special_tokens=False)
            bos = processors.TemplateProcessing(single=f"{self.bos_token} $A", pair=f"{self.bos_token} $A $B:1",
                                                special_tokens=[(self.bos_token, self.bos_id)])
            tok.post_processor = bos if tok.post_processor is None else processors.Sequence(
                [tok.post_processor, bos])
        config = json.dumps(self.hf_config(model_max_length), indent=2, ensure_ascii=False) + "\n"
        return {TOKENIZER: tok.to_str(), "tokenizer_config.json": config}

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The token ids of a chat prompt, bos included: the checkpoint's own Jinja template when it
        has one, else frugallm's, [bos] + (<|role|> content <|eos|>)* + <|assistant|>.

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]. Contents are
        encoded as plain text, so no message can forge a turn or any other control token."""
        return self._encode_chat(messages, add_generation_prompt)[0]

    def encode_chat_masked(self, messages: list[dict],
                           add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation for supervised fine-tuning: `encode_chat`'s ids, and a 0/1 per
        token, 1 where the token is a target of the loss.

        The targets are each assistant turn's reply: its content's tokens, then the template's tokens
        after that content up to and including the first control token (a special token of the
        vocabulary: <|eos|> in frugallm's template, <｜end▁of▁sentence｜> in DeepSeek's, <|im_end|> in
        ChatML, <|eot_id|> in Llama 3's), which ends the turn and teaches the model to stop. The rest
        (bos, role markers, the text between turns, system and user contents) is context. A template
        that writes no control token after an assistant content gives that turn no end target."""
        return self._encode_chat(messages, add_generation_prompt)

    def _encode_chat(self, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"chat message {i} must be a dict with a string 'content', got {m!r:.80}")
            if m.get("role") not in ROLES:
                raise ValueError(f"chat message {i}: role {m.get('role')!r} must be system, user or assistant")
        if self.chat_template is not None:
            return self._encode_with_template(messages, add_generation_prompt)
        roles = {r: self.tok.token_to_id(f"<|{r}|>") for r in ROLES}
        if None in roles.values() or self.eos_id is None:
            raise ValueError("this tokenizer has neither a chat template (tokenizer_config.json 'chat_template') "
                             "nor frugallm's role tokens <|system|> <|user|> <|assistant|> <|eos|>; "
                             "use a plain-text prompt (frugallm generate, /v1/completions) instead")
        ids = [] if self.bos_id is None else [self.bos_id]
        mask = [0] * len(ids)
        for m in messages:
            content = self.encode(m["content"])
            ids += [roles[m["role"]], *content, self.eos_id]
            target = int(m["role"] == "assistant")  # the reply and its <|eos|>, not the role token
            mask += [0] + [target] * (len(content) + 1)
        if add_generation_prompt:
            ids, mask = ids + [roles["assistant"]], mask + [0]
        return ids, mask

    def _encode_with_template(self, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        # Render with a random placeholder per content, then encode the template's text with special
        # tokens recognised and each placeholder's content as plain text. The placeholder holds no
        # character a template would escape or strip, and is unguessable, so content cannot fake one.
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        nonce = secrets.token_hex(8)
        marks = {f"FRUGALLMCONTENT{nonce}N{i}E": m["content"] for i, m in enumerate(messages)}
        placeheld = [{**m, "content": mark} for m, mark in zip(messages, marks)]

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            text = env.from_string(self.chat_template).render(
                messages=placeheld, add_generation_prompt=add_generation_prompt, raise_exception=raise_exception,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise ValueError(f"the checkpoint's chat template refused these messages: {e}") from None
        pattern = re.compile("|".join(map(re.escape, marks)))
        if nonce in pattern.sub("", text) or not all(mark in text for mark in marks):
            # a template that slices, cases or drops a content: what it would do to the real text is
            # unknown here, and rendering the real text would read control tokens in it
            raise ValueError("the checkpoint's chat template altered or dropped a message's content, so frugallm "
                             "cannot keep that content plain text; use a plain-text prompt (/v1/completions)")
        roles = {mark: m["role"] for mark, m in zip(marks, messages)}
        controls = {i for i, t in self._template_tok.get_added_tokens_decoder().items() if t.special}
        controls |= {self.eos_id} - {None}
        ids: list[int] = []
        mask: list[int] = []
        pos, after_reply = 0, False
        for found in [*pattern.finditer(text), None]:
            template = self._template_tok.encode(text[pos:found.start() if found else len(text)],
                                                 add_special_tokens=False).ids
            end = next((k + 1 for k, i in enumerate(template) if i in controls), 0) if after_reply else 0
            ids += template
            mask += [1] * end + [0] * (len(template) - end)  # the assistant turn's end: up to its control token
            if found is None:
                return ids, mask
            content = self.encode(marks[found.group()])
            after_reply = roles[found.group()] == "assistant"
            ids += content
            mask += [int(after_reply)] * len(content)
            pos = found.end()


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes byte b as one printable character; this maps each back to b."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + n): b for n, b in enumerate(moved)}}


_BYTE_OF = _byte_level_alphabet()


class TextStream:
    """Incremental decoding for streaming output.

    One token can hold part of a UTF-8 character (byte-level BPE), and some decoders change a piece's text by
    its neighbours (a leading space), so the text of new tokens is the decode of a short window of recent
    tokens minus the decode of the window without them. Text that ends in U+FFFD (an unfinished character)
    is held back until a later token completes it, but never more than 3 tokens: a character has at most
    4 bytes, so older bytes that still decode to U+FFFD are invalid and go out as they are (a degenerate
    model can emit such bytes forever). `flush()` gives whatever is left at the end.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the context window, ids[read:] not yet emitted

    def push(self, ids: int | Iterable[int]) -> str:
        self.ids.extend([ids] if isinstance(ids, int) else ids)
        return self._step(final=False)

    def flush(self) -> str:
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        decode = lambda end: self.tokenizer.decode(self.ids[self.prefix:end])
        before, n = decode(self.read), len(self.ids)
        for end in [n] if final else range(n, max(self.read, n - 3), -1):  # hold back 0, 1 or 2 tokens
            text = decode(end)
            if final or not text.endswith("\ufffd"):
                break
        else:
            if n - 3 <= self.read:
                return ""  # up to 3 tokens may still complete a character: wait
            end = n - 3
            text = decode(end)
        if len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, end
        return text[len(before):]


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens and the 256 bytes included)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must be >= {256 + len(SPECIAL_TOKENS)} "
                         f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def train_tokenizer_dir(texts: Iterator[str], vocab_size: int, out: str | os.PathLike) -> Tokenizer:
    """`frugallm tokenizer train --out DIR`: train (train_tokenizer) and write DIR/tokenizer.json through
    io.py, whole or not at all and sealed by a manifest. DIR is checked before the training: only an
    older tokenizer directory is replaced, never a run (its tokenizer is what its weights were trained
    with), a checkpoint or export, a folder of other files, the working or the home directory."""
    from .io import check_output, write_directory

    check_output(out, "tokenizer", suggest="tokenizers/NAME")
    tok = train_tokenizer(texts, vocab_size)
    with write_directory(out, "tokenizer") as tmp:
        tok.save(tmp)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load tokenizer.json from a file or a directory (frugallm run or Hugging Face checkpoint)."""
    path = Path(path)
    file = path / TOKENIZER if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no tokenizer.json at {path}; train one with `frugallm tokenizer train`")
    tok = _HFTokenizer.from_file(str(file))
    cfg = file.parent / "tokenizer_config.json"
    meta = json.loads(cfg.read_text()) if cfg.exists() else {}  # a Hugging Face checkpoint's own specials
    template = meta.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and all(tok.token_to_id(t) is not None for t in DEEPSEEK_CHAT_TOKENS):
        template = DEEPSEEK_CHAT_TEMPLATE  # DeepSeek-V3.2 (see DEEPSEEK_CHAT_TEMPLATE)
    if tok.token_to_id("<|bos|>") is not None:
        return Tokenizer(tok, chat_template=template)
    pick = lambda v: v.get("content") if isinstance(v, dict) else v
    return Tokenizer(tok, bos=pick(meta.get("bos_token")), eos=pick(meta.get("eos_token")), chat_template=template)
