"""lm-evaluation-harness against `frugallm serve`: a small multiple-choice task over a local JSONL file
(tests/data/lm_eval, read offline by `datasets`) scored by `lm_eval --model local-completions` through the
server's /v1/completions gives the same accuracy as `lm_eval --model hf` on the run's `to_hf` export, and
every per-choice log-likelihood within 1e-3.

What local-completions sends for a log-likelihood request (lm_eval/models/openai_completions.py,
api_models.py): POST base_url with 'Authorization: Bearer $OPENAI_API_KEY' and
{"model", "prompt": [[token ids], ...] (context + continuation, up to batch_size prompts; BOS first with
add_bos_token=True),
"temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true}; it reads, per choice sorted
by "index", sum(logprobs.token_logprobs[ctxlen:-1]) (the echoed prompt's continuation: the last entry is
the one generated token) and compares each of those against max(logprobs.top_logprobs[i].values()).
Both backends tokenize with the export's tokenizer and put BOS first, as frugallm does, so they score the
same ids: hf by the tokenizer's default (the export's tokenizer adds BOS), local-completions by add_bos_token.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import serve_process

for _module in ("lm_eval", "transformers", "fastapi",
                "accelerate",  # lm_eval --model hf (lm-eval[hf])
                "tenacity", "aiohttp", "requests"):  # --model local-completions (lm-eval[api])
    pytest.importorskip(_module)

# About 45-60 s beyond the session's tiny_run on 2 cores (more when they are busy): three lm_eval runs of
# 11-20 s each (the hf reference, local-completions at batch sizes 1 and 4; mostly lm_eval's start-up) and a
# server start.

DATA = Path(__file__).parent / "data" / "lm_eval"
TASK = "frugallm_mc"
KEY = "sk-test-lm-eval"
NAME = "tiny-lm-eval"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def _lm_eval(tasks: Path, out: Path, *args: str, env: dict | None = None) -> tuple[float, dict, dict]:
    """`lm_eval --tasks TASK *args` run from `tasks` (the task's folder: its data_files path is relative to
    the working directory), samples logged under `out`: (acc, {doc_id: [log-likelihood of each choice]},
    {doc_id: [is_greedy of each choice]})."""
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(out / "datasets-cache"), **(env or {})}
    cmd = [sys.executable, "-m", "lm_eval", "--tasks", TASK, "--include_path", str(tasks),
           "--output_path", str(out), "--log_samples", *args]
    proc = subprocess.run(cmd, cwd=tasks, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = next(out.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()
    lls, greedy = {}, {}
    for line in samples:  # filtered_resps: one [str(loglikelihood), str(is_greedy)] per choice
        s = json.loads(line)
        lls[s["doc_id"]] = [float(ll) for ll, _ in s["filtered_resps"]]
        greedy[s["doc_id"]] = [g == "True" for _, g in s["filtered_resps"]]
    return results["results"][TASK]["acc,none"], lls, greedy


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """A copy of tests/data/lm_eval to run lm_eval in, so nothing it writes lands in the source tree."""
    return Path(shutil.copytree(DATA, tmp_path_factory.mktemp("lm_eval") / "tasks"))


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory) -> Path:
    import frugallm

    return frugallm.to_hf(frugallm.load(tiny_run), tmp_path_factory.mktemp("hf") / "hf", dtype=torch.float32,
                          tokenizer=tiny_run)


@pytest.fixture(scope="module")
def hf_scores(export, tasks, tmp_path_factory):
    """lm-eval's own transformers backend on the export, in fp32 on the CPU: the reference."""
    return _lm_eval(tasks, tmp_path_factory.mktemp("out_hf"), "--model", "hf", "--model_args",
                    f"pretrained={export},dtype=float32", "--device", "cpu", "--batch_size", "1")


def test_both_backends_score_the_same_ids_with_bos(tiny_run, export):
    """hf encodes with the tokenizer's default (add_special_tokens=True), local-completions with
    add_special_tokens=add_bos_token (True below) and sends the ids as they are: BOS first either way,
    as frugallm's own encoding has it."""
    from transformers import AutoTokenizer

    from frugallm.tokenizer import load_tokenizer

    tok = AutoTokenizer.from_pretrained(export)
    text = "a park cat sat on the cat and sat the ✓ é"
    ids = load_tokenizer(tiny_run).encode(text)
    assert tok(text).input_ids == [tok.bos_token_id, *ids] and tok(text, add_special_tokens=False).input_ids == ids


def test_the_hf_reference_scores_every_choice_of_every_example(hf_scores):
    acc, lls, _ = hf_scores
    docs = [json.loads(line) for line in (DATA / f"{TASK}.jsonl").read_text().splitlines()]
    assert sorted(lls) == list(range(len(docs)))
    for i, doc in enumerate(docs):
        assert len(lls[i]) == len(doc["choices"])
        assert all(ll < 0 for ll in lls[i])
    assert acc == sum(max(range(len(lls[i])), key=lls[i].__getitem__) == doc["label"]
                      for i, doc in enumerate(docs)) / len(docs)


@pytest.fixture(scope="module")
def server(tiny_run):
    """`frugallm serve` on the run, in fp32 like the reference."""
    with serve_process(tiny_run, KEY, "--dtype", "float32", "--model-name", NAME) as (base, _):
        yield base


@pytest.mark.parametrize("batch_size", [1, 4])  # 4: several prompts per request, of different lengths
def test_local_completions_against_the_server_matches_hf_on_the_export(server, export, tasks, hf_scores, tmp_path,
                                                                       batch_size):
    hf_acc, hf_lls, hf_greedy = hf_scores
    args = (f"model={NAME},base_url={server}/v1/completions,tokenizer_backend=huggingface,tokenizer={export},"
            "tokenized_requests=True,num_concurrent=1,max_retries=1,add_bos_token=True")
    acc, lls, greedy = _lm_eval(tasks, tmp_path / "out", "--model", "local-completions", "--model_args", args,
                                "--batch_size", str(batch_size), env={"OPENAI_API_KEY": KEY})
    assert sorted(lls) == sorted(hf_lls)
    for doc_id in hf_lls:
        assert lls[doc_id] == pytest.approx(hf_lls[doc_id], abs=1e-3), f"doc {doc_id}"
    assert acc == hf_acc
    # is_greedy: local-completions takes a token as greedy when its token_logprobs entry equals the largest
    # value of that position's top_logprobs (exactly); hf when it is the argmax of the logits
    assert greedy == hf_greedy
