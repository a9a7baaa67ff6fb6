"""`frugallm eval RUN --task FILE [--samples k]`: accuracy and pass@k under the tasks' own verifiers.

pass@k is Chen et al. (2021)'s unbiased estimator: with n samples of a problem of which c are right,
    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i),
averaged over the problems (the product form never forms the binomials, which overflow). Accuracy is the
share of all samples that are right (pass@1's estimate). One sample is greedy unless a temperature is given.
"""

from __future__ import annotations

import math

from ..formats import checkpoint
from ..plan import load as load_model
from . import rewards as reward_fns
from .rollout import completion_text, prompt_ids, sample, seed_for
from .tasks import load_tasks


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with c right out of n samples (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    return sorted({1 << j for j in range(n.bit_length()) if 1 << j <= n} | {n})


def evaluate_task(run: str, task: str, samples: int = 1, temperature: float | None = None,
                  max_new_tokens: int = 32, seed: int = 0, limit: int | None = None) -> dict:
    """{"accuracy", "pass@k" for k in ks_for(samples), "problems", "samples"} of `run` on `task`."""
    if samples < 1:
        raise ValueError(f"--samples {samples} must be >= 1")
    temperature = (0.0 if samples == 1 else 1.0) if temperature is None else temperature
    if samples > 1 and temperature <= 0:
        raise ValueError("--samples > 1 with temperature 0 gives the same greedy answer each time; sample "
                         "(--temperature 1) or ask for --samples 1")
    records = load_tasks(task)[:limit]
    model, tok = load_model(run).float().eval(), checkpoint.load_tokenizer(run)
    jobs = [r for r in records for _ in range(samples)]
    rollouts = sample(model, tok, [prompt_ids(tok, r["prompt"]) for r in jobs], max_new_tokens, temperature,
                      [seed_for(seed, -1, i) for i in range(len(jobs))])
    right = [reward_fns.score(["verifier"], r["prompt"], completion_text(tok, o), r) >= 1.0
             for r, o in zip(jobs, rollouts)]
    counts = [sum(right[i * samples:(i + 1) * samples]) for i in range(len(records))]
    out = {"problems": len(records), "samples": samples, "temperature": temperature,
           "accuracy": sum(right) / len(right)}
    for k in ks_for(samples):
        out[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in counts) / len(records)
    return out
