"""Sequence-level distillation, step one: the teacher writes completions, as text, for the student's SFT.

DeepSeek-R1's distilled models are this recipe: sample the teacher on a set of prompts, then fine-tune
the student on the samples with the loss on the completions only (train/data.py reads the records
written here as SFT records). Text, not token ids, goes from one to the other, so the teacher may have
any tokenizer: this is the distillation for a teacher whose vocabulary is not the student's.

teacher    a path `frugallm.load_for_inference` opens (a frugallm run or checkpoint, a Hugging Face
           DeepSeek-V2/V3 directory), batched through infer/generate.py; or any other `transformers`
           causal-LM directory (its config.json's model_type is not DeepSeek's), through
           AutoModelForCausalLM.generate (the optional [hf] extra)
prompts    .jsonl: one object per line, {"prompt": str} or {"messages": [{"role", "content"}, ...]}
           (a trailing assistant turn, as in an SFT record used as a prompt, is dropped: the teacher
           writes its own); any other file: one plain-text prompt per non-blank line
output     JSONL, one record per (prompt_index, sample), in that order: {"prompt", "completion"} for a
           plain prompt, {"messages": [..., {"role": "assistant", "content": reply}]} for a chat, plus
           "prompt_index", "sample" and "finished" (false: cut at max_new_tokens, not at the teacher's eos)

Resuming. Each record is appended, flushed and fsynced; at a restart the records already written are
kept and skipped, and a torn last line (a crash mid-write) is dropped. The work list (prompt_index,
sample) is cut into fixed batches of `batch_size`, and each batch's sampling generator is seeded from
(seed, prompt_index, sample) of its first item. A batch already written is skipped whole and one partly
written is run again whole (same rows, same seed), writing only what is missing, so a resumed run writes
what the uninterrupted run would have, given the same arguments. (One generator draws for the whole
batch, as infer/generate.py samples, so changing batch_size changes the samples.)
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from pathlib import Path

import torch



def read_prompts(path: str | os.PathLike) -> list[str | list[dict]]:
    """The prompts of a .jsonl file ({"prompt"} or {"messages"} per line) or a text file (one per line)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path} line {n + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON: {e}") from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            messages = obj["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages):
                raise ValueError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} string objects")
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            if not messages:
                raise ValueError(f"{where}: no message is left once the trailing assistant turns are dropped")
            prompts.append(messages)
        else:
            raise ValueError(f"{where} has neither a string 'prompt' nor a 'messages' list")
    return prompts


def describe(stats: dict) -> str:
    """generate_samples' stats as one line for a person: what was written, what was there already."""
    asked = f"{stats['samples']:,} sample{'s' if stats['samples'] != 1 else ''} ({stats['prompts']:,} prompts x " \
            f"{stats['samples'] // max(stats['prompts'], 1)})"
    if not stats["written"]:
        return f"{stats['out']} already holds all {asked}: nothing to do"
    cut = f"; {stats['unfinished']:,} cut at the token limit (max_new_tokens)" if stats["unfinished"] else ""
    there = f"; {stats['kept']:,} were there already" if stats["kept"] else ""
    return (f"wrote {stats['written']:,} of {asked} to {stats['out']}{there}{cut}; {stats['new_tokens']:,} new tokens "
            f"in {stats['seconds']:.1f} s ({stats['tokens_per_s']:,.0f} tokens/s) from the {stats['teacher']} teacher")


def generate_samples(teacher: str | os.PathLike, prompts_path: str | os.PathLike, out_path: str | os.PathLike, *,
                     samples_per_prompt: int = 1, max_new_tokens: int = 256, temperature: float = 0.7,
                     top_p: float = 0.95, batch_size: int = 8, seed: int = 0, progress: bool = True) -> dict:
    """Sample `teacher` `samples_per_prompt` times per prompt of `prompts_path`, appending the records to
    `out_path` (resumable; see the module docstring). Returns the stats: prompts, samples (asked),
    kept (already in out_path), written, unfinished (cut at max_new_tokens, of those written),
    new_tokens, seconds, tokens_per_s, teacher (its kind: "frugallm" or "transformers"), out."""
    from tqdm import tqdm

    if samples_per_prompt < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"samples_per_prompt={samples_per_prompt}, batch_size={batch_size} and "
                         f"max_new_tokens={max_new_tokens} must each be >= 1")
    prompts_path, out_path = Path(prompts_path), Path(out_path)
    if out_path.exists() and out_path.resolve() == prompts_path.resolve():
        raise ValueError(f"the output {out_path} is the prompts file; write the samples elsewhere")
    prompts = read_prompts(prompts_path)
    if not prompts:
        raise ValueError(f"{prompts_path} holds no prompts")
    opened = _open_teacher(Path(teacher))  # a missing or unreadable teacher fails before out_path is touched
    done = _written(out_path, prompts)
    work = [(j, i) for j in range(len(prompts)) for i in range(samples_per_prompt)]
    batches = [work[k: k + batch_size] for k in range(0, len(work), batch_size)]
    todo = [b for b in batches if any(item not in done for item in b)]
    kept = sum(item in done for item in work)
    stats = dict(prompts=len(prompts), samples=len(work), kept=kept, written=0, unfinished=0, new_tokens=0,
                 seconds=0.0, tokens_per_s=0.0, teacher=None, out=str(out_path))
    if not todo:
        return stats
    model = _load_teacher(opened)
    stats["teacher"] = model.kind
    encoded = {}
    t0 = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "ab") as f, tqdm(total=len(work), initial=kept, disable=not progress, unit="sample",
                                          desc="teacher samples") as bar:
        if f.tell() == 0:
            _fsync_dir(out_path.parent)  # the new file's name is on disk too
        for batch in todo:
            for j, _ in batch:
                if j not in encoded:
                    encoded[j] = model.encode(prompts[j])
                    if len(encoded[j]) >= model.context:
                        raise ValueError(f"prompt {j} is {len(encoded[j])} tokens, the teacher's whole context "
                                         f"({model.context}); shorten it or drop it")
            j0, i0 = batch[0]
            replies = model.complete([encoded[j] for j, _ in batch], max_new_tokens, temperature, top_p,
                                     _seed(seed, j0, i0))
            for (j, i), (text, n_tokens, finished) in zip(batch, replies):
                if (j, i) in done:
                    continue
                f.write((json.dumps(_record(prompts[j], text, j, i, finished), ensure_ascii=False) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
                stats["written"] += 1
                stats["unfinished"] += not finished
                stats["new_tokens"] += n_tokens
                bar.update(1)
    stats["seconds"] = time.perf_counter() - t0
    stats["tokens_per_s"] = stats["new_tokens"] / max(stats["seconds"], 1e-9)
    return stats


def _record(prompt: str | list[dict], reply: str, j: int, i: int, finished: bool) -> dict:
    if isinstance(prompt, str):
        body = {"prompt": prompt, "completion": reply}
    else:
        body = {"messages": [*prompt, {"role": "assistant", "content": reply}]}
    return {**body, "prompt_index": j, "sample": i, "finished": finished}


def _seed(seed: int, j: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{j}|{i}".encode()).digest()[:8], "little") >> 1


def _written(out_path: Path, prompts: list) -> set[tuple[int, int]]:
    """The (prompt_index, sample) pairs already in out_path. A torn last line (no newline after it, or not
    JSON) that follows records of this very job is cut off the file: its record is written again. Any
    other line that is not such a record (the file is someone else's) is refused, and nothing is cut."""
    if not out_path.exists():
        return set()
    if not out_path.is_file():
        raise ValueError(f"{out_path} is not a file; pass a .jsonl file path as --out")
    lines = out_path.read_bytes().split(b"\n")  # the last item: what follows the last newline
    last = max((k for k, line in enumerate(lines) if line.strip()), default=-1)
    done, offset = set(), 0
    for k, line in enumerate(lines):
        if line.strip():
            rec = _sample_record(line, prompts)
            # a crash mid-write tears the last record: a line that is not JSON, taken for a torn record only
            # after this job's own records (alone, it is somebody's file), or one of this job's records
            # with no newline after it yet
            if k == last and (rec is None and done or rec is not None and k == len(lines) - 1):
                os.truncate(out_path, offset)
                break
            if rec is None:
                raise ValueError(f"{out_path} line {k + 1} is not a sample of this prompts file, so the file is "
                                 "not this job's output; use another output path, or delete it to start over")
            done.add(rec)
        offset += len(line) + 1
    return done


def _sample_record(line: bytes, prompts: list) -> tuple[int, int] | None:
    """(prompt_index, sample) of a record of these prompts written by generate_samples, else None."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    j, i = (rec.get("prompt_index"), rec.get("sample")) if isinstance(rec, dict) else (None, None)
    if isinstance(j, int) and isinstance(i, int) and 0 <= j < len(prompts) and _same_prompt(rec, prompts[j]):
        return j, i
    return None


def _same_prompt(rec: dict, prompt: str | list[dict]) -> bool:
    if isinstance(prompt, str):
        return rec.get("prompt") == prompt
    return isinstance(rec.get("messages"), list) and rec["messages"][:-1] == prompt


def _fsync_dir(path: Path) -> None:
    from ..io import _fsync

    _fsync(path)


# --- teachers: encode a prompt, complete a batch ---------------------------------------------------

def _open_teacher(path: Path):
    """What the teacher directory is (formats/open.py), its weights not read: a FileNotFoundError naming it
    when it is no model directory."""
    from ..formats.open import open as open_model

    return open_model(path)


def _load_teacher(opened):
    if not opened.deepseek:
        return _TransformersTeacher(opened.path)  # a Hugging Face model frugallm's Transformer cannot hold
    return _FrugallmTeacher(opened.path)


def _cut(ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """ids up to (without) the first stop id, and whether there was one."""
    k = next((k for k, t in enumerate(ids) if t in stops), None)
    return (ids, False) if k is None else (ids[:k], True)


class _FrugallmTeacher:
    kind = "frugallm"

    def __init__(self, path: Path):
        from ..formats.checkpoint import load_tokenizer
        from ..plan import load_for_inference

        self.model = load_for_inference(path)
        self.tokenizer = load_tokenizer(path)
        self.context = self.model.config.max_seq_len

    def encode(self, prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, list):
            return self.tokenizer.encode_chat(prompt, add_generation_prompt=True)
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        return bos + self.tokenizer.encode(prompt)

    def complete(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[tuple[str, int, bool]]:
        from ..infer.generate import generate

        n = min(max_new_tokens, self.context - max(map(len, prompts)))
        eos = self.tokenizer.eos_id
        new = generate(self.model, prompts, n, temperature=temperature, top_p=top_p, seed=seed, stop=eos)
        out = []
        for row in new.tolist():
            ids, finished = _cut(row, {eos} - {None})
            out.append((self.tokenizer.decode(ids), len(ids) + finished, finished))
        return out


class _TransformersTeacher:
    kind = "transformers"

    def __init__(self, path: Path):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ValueError(f"{path} is a transformers model (config.json model_type is not DeepSeek's); "
                             "it needs the optional extra: pip install 'frugallm[hf]'") from e
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.stops = set([eos] if isinstance(eos, int) else eos or [])
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else min(self.stops, default=0)
        self.context = getattr(self.model.config, "max_position_embeddings", None) or 2**31

    def encode(self, prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        # message contents are text: their control-token look-alikes stay text where transformers can say so
        safe = "sanitize_control_tokens" in inspect.signature(self.tokenizer.apply_chat_template).parameters
        ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False,
                                                 **({"sanitize_control_tokens": True} if safe else {}))
        return list(ids)

    def complete(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[tuple[str, int, bool]]:
        T = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (T - len(p)) + p for p in prompts])  # left-padded
        attention = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else {
            "do_sample": False}
        with torch.random.fork_rng(), torch.inference_mode():
            torch.manual_seed(seed)
            new = self.model.generate(input_ids=ids, attention_mask=attention,
                                      max_new_tokens=min(max_new_tokens, self.context - T),
                                      pad_token_id=self.pad, eos_token_id=sorted(self.stops) or None, **sampling)
        out = []
        for row in new[:, T:].tolist():
            toks, finished = _cut(row, self.stops)
            out.append((self.tokenizer.decode(toks, skip_special_tokens=True), len(toks) + finished, finished))
        return out
