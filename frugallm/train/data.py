"""Training data: documents -> tokens -> memory-mapped shards with a manifest -> packed batches.

Sources (`TrainConfig.data`):
  ""               the built-in corpus: the Python standard library's own .py files, read from the
                   running interpreter (sysconfig "stdlib", site-packages excluded). ~1,800 files,
                   ~31 MB of real code, comments and docstrings on CPython 3.11; PSF License.
  a path or glob   text files (each file one document) and .jsonl files (one JSON object per line:
                   `text_field`, or an SFT record, below)
  "hf:NAME[:SPLIT]" a Hugging Face `datasets` name or local dataset dir (optional extra, never needed)

A document is plain text, or an SFT record (supervised fine-tuning; `frugallm distill generate` writes
them), which says which tokens the loss counts:
  {"prompt": str, "completion": str}  BOS + prompt + completion + EOS, the loss on the completion and EOS
  {"messages": [{"role", "content"}, ...]}  through the chat template (Tokenizer.encode_chat_masked), the
                   loss on each assistant reply and the control token ending its turn

Each document is split into train or val by a hash of its id (deterministic, order-free), encoded as
BOS + tokens + EOS, and the documents are appended, a bounded batch at a time (memory does not grow
with the corpus), to one flat token stream per split in the data cache, whose on-disk layout
(the streams, the uint8 mask streams of a source holding SFT records, data.json, the io.py manifest
verified on every load) is formats/data_cache.py's. The cache key is the source fingerprint (paths,
sizes, mtimes) + tokenizer hash + split fraction + text field, so a second run reuses the shards.
Batches are windows of seq_len + 1 tokens (packed: one window may span documents); which window a
step reads is a pure function of (seed, step), so a resumed run reads exactly what the uninterrupted
run would have. A target whose token's mask is 0 is -100 (the loss's ignore_index).
"""

from __future__ import annotations

import codecs
import contextvars
import functools
import glob as globlib
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..formats import data_cache
from ..formats.data_cache import Splits  # noqa: F401 (re-exported: prepare returns it)
from ..io import cache_root  # noqa: F401 (train/setup.py finds its tokenizer cache through this module)
from ..tokenizer import ROLES, Tokenizer


# --- documents -------------------------------------------------------------------------------

_COUNTING: contextvars.ContextVar["_Replacements"] = contextvars.ContextVar("frugallm_replacements")


@functools.cache
def _replace_and_count() -> str:
    """The codec error handler's name, registered once per process (codecs keeps handlers forever)."""
    def handle(err: UnicodeDecodeError):
        _COUNTING.get().count += err.end - err.start  # into the _Replacements decoding right now
        return "\ufffd" * (err.end - err.start), err.end

    codecs.register_error("frugallm-replace-and-count", handle)
    return "frugallm-replace-and-count"


class _Replacements:
    """Counts undecodable bytes: they are replaced by U+FFFD (one per byte), and the total goes in data.json."""

    def __init__(self):
        self.count = 0

    def decode(self, raw: bytes) -> str:
        token = _COUNTING.set(self)
        try:
            return raw.decode("utf-8", errors=_replace_and_count())
        finally:
            _COUNTING.reset(token)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))


def resolve_files(source: str) -> list[Path]:
    if source == "":
        return stdlib_files()
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in globlib.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"data {source!r} is neither a file, a directory nor a glob matching files")
    if not files:
        raise ValueError(f"data directory {source!r} holds no files")
    return files


def iter_documents(source: str, text_field: str = "text",
                   replacements: _Replacements | None = None) -> Iterator[tuple[str, str]]:
    """(document id, text) pairs, in a deterministic order; undecodable bytes counted in `replacements`.
    An SFT record's text is its prompt + completion, or its messages' contents one per line."""
    for doc, example in iter_examples(source, text_field, replacements):
        yield doc, example_text(example)


def example_text(example: str | dict) -> str:
    if isinstance(example, str):
        return example
    if "messages" in example:
        return "\n".join(m["content"] for m in example["messages"])
    return example["prompt"] + example["completion"]


def iter_examples(source: str, text_field: str = "text",
                  replacements: _Replacements | None = None) -> Iterator[tuple[str, str | dict]]:
    """(document id, document) pairs, in a deterministic order: a document is its text, or an SFT record
    {"prompt", "completion"} or {"messages"} (checked and normalised); undecodable bytes counted in
    `replacements`."""
    replacements = replacements or _Replacements()
    if source.startswith("hf:"):
        yield from _hf_documents(source, text_field)
        return
    files = resolve_files(source)
    # ids relative to the files' common folder: the train / val split (is_val hashes the id) is then
    # the same wherever the corpus sits, on every machine (the built-in corpus included)
    root = Path(os.path.commonpath(files)) if len(files) > 1 else files[0].parent
    for path in files:
        doc = path.relative_to(root).as_posix()
        if path.suffix != ".jsonl":
            yield doc, replacements.decode(path.read_bytes())
            continue
        n = 0  # .jsonl is read a line at a time; str.splitlines numbers the lines as for the whole text
        with open(path, "rb") as f:  # (a b"\n" never sits inside a UTF-8 character, so decoding agrees)
            for raw in f:
                for line in replacements.decode(raw).splitlines():
                    if line.strip():
                        yield f"{doc}:{n}", _record(_json_line(line, f"{path} line {n + 1}"), text_field,
                                                    f"{path} line {n + 1}")
                    n += 1


def _json_line(line: str, where: str) -> dict:
    """One .jsonl line's object, or a ValueError naming the file and the line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e}); each line of a .jsonl file is one JSON object") from None
    if not isinstance(obj, dict):
        shown = repr(obj) if len(repr(obj)) <= 40 else repr(obj)[:37] + "..."
        raise ValueError(f"{where} is {shown}, not a JSON object; each line of a .jsonl file is one object such as "
                         '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}')
    return obj


def _record(obj: dict, text_field: str, where: str) -> str | dict:
    if text_field in obj:
        return str(obj[text_field])
    if "prompt" in obj and "completion" in obj:
        return {"prompt": str(obj["prompt"]), "completion": str(obj["completion"])}
    if "messages" in obj:
        messages = obj["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                for m in messages)):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\": system | user | "
                             f"assistant, \"content\": string}} objects")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    raise ValueError(f"{where} has neither {text_field!r} nor prompt/completion fields nor messages; "
                     f"set text_field to the field holding the text")


def _hf_documents(source: str, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"data {source!r} needs the optional `datasets` package: pip install datasets") from e
    name, _, split = source[3:].partition(":")
    ds = datasets.load_dataset(name, split=split or "train")
    for i, row in enumerate(ds):
        yield f"{name}:{i}", _record(row, text_field, f"{name} row {i}")


SPLIT_VERSION = 2  # 2: documents are split by their path relative to the corpus (1: absolute path)


def fingerprint(source: str) -> str:
    h = hashlib.sha256(f"{SPLIT_VERSION}|{source}".encode())
    if not source.startswith("hf:"):
        for p in resolve_files(source):
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def is_val(doc_id: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return h / 2**64 < val_fraction


# --- shards (the layout: formats/data_cache.py) -----------------------------------------------

def prepare(source: str, tokenizer: Tokenizer, val_fraction: float = 0.01, text_field: str = "text",
            cache_dir: Path | None = None) -> Splits:
    """Tokenize `source` into cached train/val shards (reused when source and tokenizer are unchanged)."""
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no bos/eos tokens, which packing needs")
    directory = data_cache.directory((fingerprint(source), tokenizer.hash(), val_fraction, text_field), cache_dir)
    if not data_cache.is_built(directory):
        _build(directory, source, tokenizer, val_fraction, text_field)
    return data_cache.open_splits(directory)  # verified on every open


def encode_examples(tokenizer: Tokenizer, examples: list[str | dict]) -> list[tuple[list[int], list[int] | None]]:
    """(ids, mask) per document, BOS and EOS included; mask None for plain text (every token a target)."""
    texts = tokenizer.encode_batch([e for e in examples if isinstance(e, str)])
    pairs = [e for e in examples if isinstance(e, dict) and "prompt" in e]
    prompts = tokenizer.encode_batch([e["prompt"] for e in pairs])
    completions = tokenizer.encode_batch([e["completion"] for e in pairs])
    texts, prompts, completions = iter(texts), iter(prompts), iter(completions)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    out = []
    for e in examples:
        if isinstance(e, str):
            out.append(([bos, *next(texts), eos], None))
        elif "prompt" in e:  # encoded apart, so the prompt's tokens are the same with any completion
            prompt, completion = next(prompts), next(completions)
            out.append(([bos, *prompt, *completion, eos], [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)))
        else:
            out.append(tokenizer.encode_chat_masked(e["messages"]))
    return out


def _build(directory: Path, source: str, tokenizer: Tokenizer, val_fraction: float, text_field: str) -> None:
    replacements = _Replacements()
    n_bytes, batch = 0, []  # batch: (doc id, document), encoded 256 at a time
    with data_cache.write(directory, tokenizer.vocab_size) as cache:
        def flush():  # encode a batch of documents and append each to its split
            for (doc_id, _), (ids, mask) in zip(batch, encode_examples(tokenizer, [e for _, e in batch])):
                cache.append("val" if is_val(doc_id, val_fraction) else "train", ids, mask)
            batch.clear()

        for doc_id, example in iter_examples(source, text_field, replacements):
            text = example_text(example)
            if text.strip():
                n_bytes += len(text.encode())
                batch.append((doc_id, example))
                if len(batch) >= 256:
                    flush()
        flush()
        if sum(cache.documents.values()) == 0:
            raise ValueError(f"data {source or 'built-in corpus'!r} holds no text")
        cache.finish(
            source=source or f"built-in: Python {sysconfig.get_python_version()} standard library (PSF License)",
            tokenizer_hash=tokenizer.hash(), n_bytes=n_bytes, replaced_bytes=replacements.count,
            val_fraction=val_fraction)


# --- batches ---------------------------------------------------------------------------------

class Batches:
    """Packed windows of seq_len + 1 tokens; batch `index` is a pure function of (seed, index).

    mask: the token stream's uint8 mask (Splits.train_mask), or None when every token is a target."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                 mask: np.ndarray | None = None):
        self.tokens, self.seq_len, self.batch_size, self.seed, self.shuffle = tokens, seq_len, batch_size, seed, shuffle
        if mask is not None and len(mask) != len(tokens):
            raise ValueError(f"the mask has {len(mask):,} entries for {len(tokens):,} tokens")
        self.mask = mask
        self.windows = (len(tokens) - 1) // seq_len  # window w covers tokens [w*S, w*S + S + 1)
        if self.windows < batch_size:
            raise ValueError(f"{len(tokens):,} tokens make {self.windows} windows of seq_len={seq_len}, fewer than "
                             f"batch_size={batch_size}; use more data or a smaller seq_len / batch_size")
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.windows, generator=g) if self.shuffle else torch.arange(self.windows)
            self._epoch = epoch
        return self._perm

    def window_ids(self, index: int) -> list[int]:
        """The windows batch `index` reads, in row order (window w: tokens [w*S, w*S + S + 1))."""
        ids = []
        for j in range(self.batch_size):
            g = index * self.batch_size + j
            ids.append(int(self._order(g // self.windows)[g % self.windows]))
        return ids

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64; targets[t] is token t + 1 of the window,
        or -100 (ignored by the loss) where the mask says that token is no target."""
        S = self.seq_len
        starts = [w * S for w in self.window_ids(index)]
        window = torch.from_numpy(np.stack([np.asarray(self.tokens[a: a + S + 1], dtype=np.int64) for a in starts]))
        inputs, targets = window[:, :-1], window[:, 1:]
        if self.mask is not None:
            keep = torch.from_numpy(np.stack([np.asarray(self.mask[a + 1: a + S + 1], dtype=bool) for a in starts]))
            targets = targets.masked_fill(~keep, -100)
        return inputs, targets


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, mask: np.ndarray | None = None) -> Batches:
    """The fixed, unshuffled val windows; a val split too small for `batch_size` evaluates in smaller batches."""
    return Batches(tokens, seq_len, min(batch_size, max((len(tokens) - 1) // seq_len, 1)), seed=0, shuffle=False,
                   mask=mask)


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int, train_mask: np.ndarray | None = None,
                 val_mask: np.ndarray | None = None) -> float:
    """Cross-entropy (nats/token) of val under the add-one-smoothed unigram distribution of train:
    the loss of a model that ignores context, the baseline a trained model must beat by far. With
    masks, only target tokens are counted, on both sides (NaN when val has none)."""
    pick = lambda tokens, mask: np.asarray(tokens, dtype=np.int64)[
        slice(None) if mask is None else np.asarray(mask, dtype=bool)]
    counts = np.bincount(pick(train, train_mask), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = pick(val, val_mask)
    return float(-logp[targets].mean()) if len(targets) else float("nan")
