"""The frozen teacher of token-level distillation, and the vocabulary check that makes its logits usable.

Token-level KD compares two next-token distributions id by id, so the teacher's logit column i must
mean the same token as the student's column i. Vocabulary SIZES say nothing about that (two BPEs of
32,000 tokens share almost no ids), so `match_vocab` compares the token -> id maps themselves. The one
accepted difference is padding: a model's embedding often has more rows than its tokenizer has tokens
(Qwen2.5: 152,064 rows, 151,665 tokens), and those rows are never a target. Their logit columns are
sliced off, so the teacher's logits are exactly as wide as the student's. Any other difference is
refused: such a teacher can still teach by sequence-level KD, where it writes text and the student
trains on it (`frugallm distill generate`, then SFT).

`Teacher` wraps a model in eval mode with requires_grad off, in the host's fastest prefill dtype
(host.py: bf16 only where it measures clearly faster), and returns fp32 logits (B, S, V_student) under
no_grad. Its `hash` (weights + compute dtype + width) keys the offline top-k cache (offline.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

SEQUENCE_KD = ("for a teacher with another tokenizer, use sequence-level distillation instead: "
               "`frugallm distill generate` (the teacher writes completions as text), then SFT the student on them")


def _token_map(tokenizer) -> dict[str, int]:
    """token -> id, added/special tokens included, of a frugallm Tokenizer or a HF `tokenizers.Tokenizer`."""
    return getattr(tokenizer, "tok", tokenizer).get_vocab(with_added_tokens=True)


def _differences(student: dict[str, int], teacher: dict[str, int], n: int = 5) -> list[str]:
    """A few tokens that differ: ids that disagree, then tokens only one side has."""
    out = []
    for token, sid in sorted(student.items(), key=lambda kv: kv[1]):
        tid = teacher.get(token)
        if tid != sid:
            where = "not in the teacher" if tid is None else f"teacher id {tid}"
            out.append(f"{token!r}: student id {sid}, {where}")
        if len(out) >= n:
            return out
    for token, tid in sorted(teacher.items(), key=lambda kv: kv[1]):
        if token not in student:
            out.append(f"{token!r}: teacher id {tid}, not in the student")
        if len(out) >= n:
            break
    return out


def match_vocab(student_tokenizer, teacher_tokenizer, teacher_vocab_size: int,
                student_vocab_size: int | None = None) -> int | None:
    """How many of the teacher's logit columns to keep: None when its logits are already as wide as
    the student's, else the student's width W (use teacher_logits[..., :W]).

    student_vocab_size: the student MODEL's logit width (default: its tokenizer's size, max id + 1).
    Raises ValueError, naming both vocabularies and a few differing tokens, unless the two tokenizers'
    token -> id maps are identical and the teacher model has at least the student's width."""
    s, t = _token_map(student_tokenizer), _token_map(teacher_tokenizer)
    n_s, n_t = max(s.values()) + 1, max(t.values()) + 1  # tokenizer sizes (ids may have holes)
    width = n_s if student_vocab_size is None else int(student_vocab_size)
    if s != t:
        diffs = "; ".join(_differences(s, t))
        raise ValueError(
            f"the teacher's vocabulary is not the student's: student tokenizer {len(s):,} tokens (ids < {n_s:,}, "
            f"model {width:,} logits), teacher tokenizer {len(t):,} tokens (ids < {n_t:,}, model "
            f"{teacher_vocab_size:,} logits); e.g. {diffs}. Token-level distillation compares the two "
            f"distributions id by id, so the token -> id maps must be identical (only padding rows may "
            f"differ); {SEQUENCE_KD}")
    if width < n_s:
        raise ValueError(f"the student model has {width:,} logit columns but its tokenizer has ids up to {n_s - 1:,}; "
                         f"its vocab_size must be at least {n_s:,}")
    if teacher_vocab_size < width:
        raise ValueError(f"the teacher model has {teacher_vocab_size:,} logit columns, fewer than the student's "
                         f"{width:,} (same tokenizer, {n_s:,} ids): its distribution says nothing about the "
                         f"student's padding columns; set the student's vocab_size to {n_s:,} .. "
                         f"{teacher_vocab_size:,}")
    return None if teacher_vocab_size == width else width


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, raw bytes), sorted by name."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype (bf16, fp8)
    return h.hexdigest()


def checkpoint_hash(path: str | Path) -> str | None:
    """A hash of what `frugallm.load(path)` reads, from its manifest (each file's sha256: no weight is
    read again); None where frugallm wrote no manifest (a downloaded Hugging Face directory)."""
    from .. import io
    from ..formats.open import open as open_model

    manifest = io.read_manifest(open_model(path).weights)
    if manifest is None:
        return None
    files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


class Teacher:
    """A frozen model giving next-token logits in the student's vocabulary.

    model: a frugallm Transformer (e.g. `frugallm.load(path)`), cast to the host's prefill dtype.
    keep: the logit columns to keep (match_vocab's answer; None: all). dtype: "auto", a name or a
    torch.dtype (plan.resolve("prefill"): host.choose_dtype's rule). source_hash: a hash of the
    weights when already known (a checkpoint manifest); by default they are hashed here."""

    def __init__(self, model: torch.nn.Module, *, keep: int | None = None, dtype="auto",
                 source_hash: str | None = None):
        from ..plan import apply, resolve

        plan = resolve("prefill", dtype=dtype)  # the weights cast to the host's prefill dtype
        base = source_hash or weights_hash(model)  # before the cast: the weights as stored
        self.model = apply(model, plan).model.eval().requires_grad_(False)
        self.dtype, self.dtype_reason = plan.dtype, plan.reasons[0]
        self.keep = keep
        self.vocab_size = keep if keep is not None else model.config.vocab_size  # V_student: the logits' width
        # the cache key: the same weights run in bf16 give other top-k log-probs than in fp32
        self.hash = hashlib.sha256(f"{base}|{plan.precision}|{self.vocab_size}".encode()).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | Path, student_tokenizer, student_vocab_size: int | None = None,
             dtype="auto") -> "Teacher":
        """The teacher at `path` (a frugallm run, checkpoint or Hugging Face directory), its vocabulary
        checked against the student's (match_vocab: a ValueError if they differ)."""
        from ..formats.checkpoint import load_tokenizer
        from ..plan import load

        teacher_tokenizer = load_tokenizer(path)
        model = load(path)
        keep = match_vocab(student_tokenizer, teacher_tokenizer, model.config.vocab_size, student_vocab_size)
        return cls(model, keep=keep, dtype=dtype, source_hash=checkpoint_hash(path))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, S) int -> logits (B, S, V_student) fp32, without a graph."""
        if ids.dim() != 2:
            raise ValueError(f"teacher ids must be (B, S), got {tuple(ids.shape)}")
        with torch.no_grad():
            logits = self.model(ids).logits  # (B, S, V_teacher)
            if self.keep is not None:
                logits = logits[..., :self.keep]  # the padding rows' columns go
            return logits.float()

    def __repr__(self) -> str:
        return f"Teacher(hash={self.hash}, vocab={self.vocab_size}, dtype={self.dtype})"
