"""Fuzzing a real `frugallm serve` with schemathesis, from the app's own OpenAPI schema.

The schema describes the chat and completion bodies (server.py adds ChatRequest and CompletionRequest, which
`parse` checks by hand), so schemathesis generates both valid requests (that generate text, within a small
cache budget so that each is quick) and invalid ones (wrong types, missing fields, out-of-range numbers). Half
the requests also carry drawn Host, Origin and Content-Type headers (the checks a keyless server makes on
them, access.py: names it answers, foreign pages, JSON bodies), so the server runs without a key. Every answer
must be below 500, arrive within 10 s, and a 4xx must be OpenAI-shaped. Bounded: at most 30 examples per
operation and mode, and 60 s in all. The figures print with `pytest -s`.
"""

import collections
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from conftest import serve_process  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the skips: schemathesis brings it)
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from test_server_load import NAME, call  # noqa: E402

EXAMPLES, SECONDS = 30, 60
TEXT = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40)  # what a header value may hold


def _headers(port: int):
    """Drawn Host, Origin and Content-Type headers, each absent, a telling value, or arbitrary text."""
    hosts = st.sampled_from([f"127.0.0.1:{port}", f"localhost:{port}", "llm.lan", "evil.example", f"[::1]:{port}",
                             "", "a.localhost", "127.0.0.1:" + "9" * 30])
    origins = st.sampled_from([f"http://127.0.0.1:{port}", "http://evil.example", "null", "file://", "",
                               f"https://127.0.0.1:{port}", "http://[::1"])
    types = st.sampled_from(["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain",
                             "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""])
    drawn = st.fixed_dictionaries({}, optional={"Host": hosts | TEXT, "Origin": origins | TEXT,
                                                "Content-Type": types | TEXT})
    return st.just({}) | drawn


def test_fuzzing_finds_no_server_error(tiny_run):
    with serve_process(tiny_run, "", "--model-name", NAME, "--allowed-hosts", "llm.lan", "--slots", "2",
                       "--max-queue", "16", "--max-cache-tokens", "256", "--request-timeout", "20",
                       env={"FRUGALLM_API_KEY": ""}) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        status, _, spec = call(base, "GET", "/openapi.json")
        assert status == 200
        schema = schemathesis.openapi.from_dict(spec)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions"}
        end, seen, failures = time.time() + SECONDS, collections.Counter(), []
        for op in operations:
            for mode in schemathesis.GenerationMode:
                @given(case=op.as_strategy(generation_mode=mode), headers=_headers(port))
                @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                def fuzz(case, headers):
                    if time.time() > end:
                        return
                    t0 = time.time()
                    r = case.call(base_url=base, headers=headers, timeout=10)
                    seen["drawn headers"] += bool(headers)
                    seen[r.status_code // 100] += 1
                    seen[op.label, r.status_code // 100] += 1
                    seen["slowest"] = max(seen["slowest"], time.time() - t0)
                    if r.status_code >= 500 or (r.status_code >= 400 and "message" not in r.json().get("error", {})):
                        failures.append(f"{case.method} {case.formatted_path} {headers} {case.body!r} -> "
                                        f"{r.status_code} {r.text[:200]}")

                try:
                    fuzz()
                except Unsatisfiable:  # negative mode on a GET without parameters (no key here): nothing to break
                    pass
        assert proc.poll() is None, "the server died"
        assert call(base, "GET", "/health")[0] == 200
        print(f"\nfuzz: {sum(seen[k] for k in (2, 4, 5))} examples over {len(operations)} operations x 2 modes: "
              f"2xx {seen[2]}, 4xx {seen[4]}, 5xx {seen[5]}; {seen['drawn headers']} with drawn headers; slowest "
              f"answer {seen['slowest']:.2f} s")
        for op in operations:
            print(f"  {op.label}: 2xx {seen[op.label, 2]}, 4xx {seen[op.label, 4]}, 5xx {seen[op.label, 5]}")
        assert not failures, "\n".join(failures[:5])
        for path in ("/v1/chat/completions", "/v1/completions"):  # valid bodies generated text, invalid got 400
            assert seen[f"POST {path}", 2] > 0 and seen[f"POST {path}", 4] > 0
