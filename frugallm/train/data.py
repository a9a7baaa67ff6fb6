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
with the corpus), to one flat uint16/uint32 stream per split on disk: `train.bin`, `val.bin`, beside
`data.json` (source, tokenizer hash, token and document counts). A source holding SFT records also
gets a parallel uint8 stream per split, `train.mask`, `val.mask`: one byte per token, 1 where the token
is a target of the loss (plain-text documents in it: all 1); a source without them has no mask files,
meaning every token counts. The directory is written through
frugallm/io.py (kind "data-cache": atomic, manifest.json verified on every load). The cache key is the
source fingerprint (paths, sizes, mtimes) + tokenizer hash + split fraction, so a second run reuses the
shards. Batches are windows of seq_len + 1 tokens (packed: one window may span
documents); which window a step reads is a pure function of (seed, step), so a resumed run reads
exactly what the uninterrupted run would have. A target whose token's mask is 0 is -100 (the loss's
ignore_index).
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import functools
import glob as globlib
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .. import io
from ..io import cache_root
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
                        yield f"{doc}:{n}", _record(json.loads(line), text_field, f"{path} line {n + 1}")
                    n += 1


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
# 3: SFT records (prompt / completion encoded apart, chat through the template) with mask streams
# 2: written through frugallm/io.py, metadata in data.json (1: in manifest.json)
CACHE_VERSION = 3


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


# --- shards ----------------------------------------------------------------------------------

@dataclass
class Splits:
    train: np.ndarray  # memory-mapped token stream
    val: np.ndarray
    manifest: dict
    directory: Path
    train_mask: np.ndarray | None = None  # uint8 per token, 1 = a target of the loss; None: all targets
    val_mask: np.ndarray | None = None


def prepare(source: str, tokenizer: Tokenizer, val_fraction: float = 0.01, text_field: str = "text",
            cache_dir: Path | None = None) -> Splits:
    """Tokenize `source` into cached train/val shards (reused when source and tokenizer are unchanged)."""
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no bos/eos tokens, which packing needs")
    key = f"{CACHE_VERSION}|{fingerprint(source)}|{tokenizer.hash()}|{val_fraction}|{text_field}"
    directory = (cache_dir or cache_root() / "data") / hashlib.sha256(key.encode()).hexdigest()[:20]
    if io.read_manifest(directory) is None:
        _build(directory, source, tokenizer, val_fraction, text_field)
    io.verify(directory, "data-cache")  # a few ms per 10 MB; a flipped bit would train on garbage
    manifest = json.loads((directory / "data.json").read_text())
    load = lambda name, dtype: np.memmap(directory / name, dtype=dtype, mode="r")
    masks = [load(f"{split}.mask", np.uint8) if manifest.get("masked") else None for split in ("train", "val")]
    return Splits(load("train.bin", manifest["dtype"]), load("val.bin", manifest["dtype"]), manifest, directory,
                  *masks)


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
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    tokens, docs, n_bytes = {"train": 0, "val": 0}, {"train": 0, "val": 0}, 0
    targets = {"train": 0, "val": 0}
    batch: list[tuple[str, str | dict]] = []
    with io.write_directory(directory, "data-cache") as tmp:
        with contextlib.ExitStack() as files:
            out = {split: files.enter_context(open(tmp / f"{split}.bin", "wb")) for split in ("train", "val")}
            masks = {}  # split -> its .mask file, opened at the first SFT record

            def open_masks():  # the tokens written before it are plain text: all targets
                for split in out:
                    masks[split] = files.enter_context(open(tmp / f"{split}.mask", "wb"))
                    for start in range(0, tokens[split], 1 << 24):
                        masks[split].write(np.ones(min(1 << 24, tokens[split] - start), np.uint8).tobytes())
                    targets[split] = tokens[split]

            def flush():  # encode a batch of documents and append each to its split's file(s)
                for (doc_id, _), (ids, mask) in zip(batch, encode_examples(tokenizer, [e for _, e in batch])):
                    split = "val" if is_val(doc_id, val_fraction) else "train"
                    if mask is not None and not masks:
                        open_masks()
                    out[split].write(np.asarray(ids, dtype=dtype).tobytes())
                    if masks:
                        mask = np.ones(len(ids), np.uint8) if mask is None else np.asarray(mask, np.uint8)
                        masks[split].write(mask.tobytes())
                        targets[split] += int(mask.sum())
                    tokens[split] += len(ids)
                    docs[split] += 1
                batch.clear()

            for doc_id, example in iter_examples(source, text_field, replacements):
                text = example_text(example)
                if text.strip():
                    n_bytes += len(text.encode())
                    batch.append((doc_id, example))
                    if len(batch) >= 256:
                        flush()
            flush()
        if docs["train"] + docs["val"] == 0:
            raise ValueError(f"data {source or 'built-in corpus'!r} holds no text")
        if tokens["val"] == 0 or tokens["train"] == 0:
            # too few documents for a document split: cut the one token stream (and its mask stream
            # alike), its head to train
            full = sum(tokens.values())
            cut = max(1, int(full * (1 - max(val_fraction, 0.01))))
            for suffix, kind in [(".bin", dtype)] + ([(".mask", np.dtype(np.uint8))] if masks else []):
                if tokens["train"] == 0:
                    os.replace(tmp / f"val{suffix}", tmp / f"train{suffix}")
                np.memmap(tmp / f"train{suffix}", dtype=kind, mode="r")[cut:].tofile(tmp / f"val{suffix}")
                os.truncate(tmp / f"train{suffix}", cut * kind.itemsize)
            if masks:
                head = int(np.memmap(tmp / "train.mask", dtype=np.uint8, mode="r").sum(dtype=np.int64))
                targets = {"train": head, "val": sum(targets.values()) - head}
            tokens = {"train": cut, "val": full - cut}
        manifest = {
            "source": source or f"built-in: Python {sysconfig.get_python_version()} standard library (PSF License)",
            "tokenizer_hash": tokenizer.hash(), "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
            "documents": docs, "tokens": tokens, "bytes": n_bytes,
            "replaced_bytes": replacements.count, "val_fraction": val_fraction,
            "masked": bool(masks), **({"target_tokens": targets} if masks else {}),
        }
        (tmp / "data.json").write_text(json.dumps(manifest, indent=2))


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
