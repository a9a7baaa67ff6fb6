"""Fuzzing a real `frugallm serve` with schemathesis, from the app's own OpenAPI schema.

The schema describes the chat and completion bodies (server.py adds ChatRequest and CompletionRequest, which
`parse` checks by hand), so schemathesis generates both valid requests (that generate text, within a small
cache budget so that each is quick) and invalid ones (wrong types, missing fields, out-of-range numbers). Every
answer must be below 500, arrive within 10 s, and a 4xx must be OpenAI-shaped. Bounded: at most 30 examples per
operation and mode, and 60 s in all. The figures print with `pytest -s`.
"""

import collections
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the skips: schemathesis brings it)
from test_server_load import KEY, _serve, call  # noqa: E402

EXAMPLES, SECONDS = 30, 60


def test_fuzzing_finds_no_server_error(tiny_run):
    with _serve(tiny_run, "--slots", "2", "--max-queue", "16", "--max-cache-tokens", "256",
                "--request-timeout", "20") as (base, proc):
        status, _, spec = call(base, "GET", "/openapi.json")
        assert status == 200
        schema = schemathesis.openapi.from_dict(spec)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions"}
        end, seen, failures = time.time() + SECONDS, collections.Counter(), []
        for op in operations:
            for mode in schemathesis.GenerationMode:
                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                def fuzz(case):
                    if time.time() > end:
                        return
                    t0 = time.time()
                    r = case.call(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
                    seen[r.status_code // 100] += 1
                    seen[op.label, r.status_code // 100] += 1
                    seen["slowest"] = max(seen["slowest"], time.time() - t0)
                    if r.status_code >= 500 or (r.status_code >= 400 and "message" not in r.json().get("error", {})):
                        failures.append(f"{case.method} {case.formatted_path} {case.body!r} -> {r.status_code} "
                                        f"{r.text[:200]}")

                fuzz()
        assert proc.poll() is None, "the server died"
        assert call(base, "GET", "/health")[0] == 200
        print(f"\nfuzz: {sum(seen[k] for k in (2, 4, 5))} examples over {len(operations)} operations x 2 modes: "
              f"2xx {seen[2]}, 4xx {seen[4]}, 5xx {seen[5]}; slowest answer {seen['slowest']:.2f} s")
        for op in operations:
            print(f"  {op.label}: 2xx {seen[op.label, 2]}, 4xx {seen[op.label, 4]}, 5xx {seen[op.label, 5]}")
        assert not failures, "\n".join(failures[:5])
        for path in ("/v1/chat/completions", "/v1/completions"):  # valid bodies generated text, invalid got 400
            assert seen[f"POST {path}", 2] > 0 and seen[f"POST {path}", 4] > 0
