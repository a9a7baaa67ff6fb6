"""Decoding V4 (hybrid attention) over its HybridCache, in every path MLA's cache goes through: greedy and
sampled generate (ragged prompts: one batch per length), MTP self-speculative decoding (rewinds by replay),
the serving engine (a cache per request, stacked by length), and the refusal of a compiled decoder; each
against the full forward, which has no cache. Then greedy generation of 32 tokens against transformers'
DeepseekV4ForCausalLM.generate with its cache, and the bytes `frugallm info` reports against the tensors the
cache holds."""

import asyncio
import re

import pytest
import torch

from frugallm import Transformer, generate
from frugallm.model.hybrid_cache import HybridCache, hybrid_values

from conftest import tiny_config

KINDS = ("sliding", "csa", "hca")
WIN, CSA, HCA = 8, 4, 8


def _cfg(**changes):
    """Three blocks (sliding, CSA, HCA) and a CSA MTP block (whose cache rewinds too), window 8, rates 4 and 8."""
    base = dict(vocab_size=61, dim=32, n_heads=4, q_lora_rank=24, qk_rope_head_dim=8, attention="hybrid", n_layers=3,
                n_mtp=1, layer_types=KINDS + ("csa",), head_dim=16, sliding_window=WIN, csa_rate=CSA, hca_rate=HCA,
                o_groups=2, o_lora_rank=12, index_topk=3, index_n_heads=4, index_head_dim=12, n_dense_layers=0,
                moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1, route_scale=1.5,
                n_expert_groups=1, n_limited_groups=1, score_func="sqrtsoftplus", swiglu_limit=10.0, n_hash_layers=1,
                residual="mhc", hc_form="release", hc_streams=2, max_seq_len=128)
    return tiny_config(**(base | changes))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(_cfg()).eval()
    with torch.no_grad():  # sinks, slot biases and a sharper head: distinct logits, a real top-k and sink
        for name, p in m.named_parameters():
            if name.endswith(("attn_sink", "ape")):
                p.normal_(0, 0.5)
        m.head.weight.mul_(20)
    return m


def _greedy_full(model, prompt: list[int], new: list[int]) -> list[int]:
    """The reference: the full forward's (no cache) greedy choice after the prompt and each prefix of `new`.
    One forward over prompt + new gives them all, as position i sees tokens <= i only (causal window, closed
    compression windows, top-k among visible entries); equal to `new` iff `new` is the full forward's greedy
    continuation."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(new)])).logits[0]
    return logits[len(prompt) - 1:-1].argmax(-1).tolist()


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 61, (n,), generator=g).tolist() for n in (6, 13, 6)]


def test_cached_decode_logits_equal_the_full_forward(model):
    """Prefill then single-token steps through HybridCache: every step's logits equal the full forward's (fp32)."""
    ids = torch.randint(0, 61, (2, 41))
    with torch.no_grad():
        want = model(ids).logits
        cache = HybridCache(model.config, 2)
        got = [model(ids[:, :9], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                         for t in range(9, 41)]
    assert (torch.cat(got, 1) - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("speculative", [False, True])
def test_generate_equals_the_full_forward(model, speculative):
    """Ragged prompts (6, 13, 6 tokens: two batches of one length) + 30 tokens cross the window and close CSA
    and HCA windows; plain and MTP-speculative greedy decoding give the full forward's tokens."""
    stats = {}
    got = generate(model, _prompts(), 30, speculative=speculative, stats=stats).tolist()
    assert got == [_greedy_full(model, p, g) for p, g in zip(_prompts(), got)]
    assert stats["new_tokens"] == 90 and (stats["drafted"] > 0) == speculative


def test_speculative_rewinds_exactly_when_drafts_are_accepted(model):
    """An MTP head that copies the main model's next-token choice drafts right often, so the verify forward
    keeps some drafts and drops others: the rewound caches still give the full forward's tokens."""
    torch.manual_seed(0)
    m = Transformer(_cfg(n_mtp=1)).eval()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():  # the MTP block passes the main model's hidden state through (its own h ~ 0)
        for p in m.mtp[0].block.parameters():
            p.zero_() if p.dim() >= 2 else None
    stats = {}
    got = generate(m, _prompts()[:2], 30, speculative=True, stats=stats).tolist()
    assert got == [_greedy_full(m, p, g) for p, g in zip(_prompts()[:2], got)]
    assert 0 < stats["accepted"] < stats["drafted"]


def test_sampled_generate_is_seeded_and_batches_by_length(model):
    """Sampling: the same seed the same tokens; a row's tokens do not depend on a batch of another length."""
    a = generate(model, _prompts(), 20, temperature=1.0, seed=3)
    b = generate(model, _prompts(), 20, temperature=1.0, seed=3)
    alone = generate(model, _prompts()[1:2], 20, temperature=1.0, seed=3)
    assert torch.equal(a, b) and torch.equal(a[1:2], alone)


def test_truncate_goes_back_only_within_the_last_forward(model):
    """Pooled windows cannot be cut: a cache rewinds by replaying its last forward's projections, so it
    refuses a length before that forward, and a cache built without rewindable=True refuses any."""
    with torch.no_grad():
        cache, plain = HybridCache(model.config, 1, rewindable=True), HybridCache(model.config, 1)
        for c in (cache, plain):
            model(torch.randint(0, 61, (1, 17)), cache=c)
            model(torch.randint(0, 61, (1, 6)), cache=c)
        cache.truncate(19)
        with pytest.raises(ValueError, match=r"go back to a length in \[17, 19\]"):
            cache.truncate(16)
        with pytest.raises(ValueError, match="rewindable=True"):
            plain.truncate(20)
    assert cache.length == 19 and plain.length == 23


def test_rewound_cache_decodes_as_the_full_forward(model):
    """Drafts d1..d4 verified after 17 tokens, 2 kept: then decoding goes on as over the kept sequence."""
    ids = torch.randint(0, 61, (1, 40))
    with torch.no_grad():
        want = model(ids).logits
        cache = HybridCache(model.config, 1, rewindable=True)
        model(ids[:, :17], cache=cache)
        drafts = torch.cat([ids[:, 17:19], torch.randint(0, 61, (1, 3))], 1)  # two right, three wrong
        model(drafts, cache=cache)
        cache.truncate(19)
        got = model(ids[:, 19:], cache=cache).logits
    assert (got - want[:, 19:]).abs().max() <= 1e-5 * want.abs().max()


def test_stacked_caches_split_back_exactly(model):
    """The engine's batching: two caches at one length stacked, one forward, split; each goes on as alone."""
    a, b = torch.randint(0, 61, (1, 23)), torch.randint(0, 61, (1, 23))
    with torch.no_grad():
        ca, cb = HybridCache(model.config, 1), HybridCache(model.config, 1)
        model(a[:, :21], cache=ca), model(b[:, :21], cache=cb)
        both = HybridCache.stack([ca, cb])
        model(torch.cat([a[:, 21:22], b[:, 21:22]]), cache=both)
        ca, cb = both.split([1, 1])
        got = torch.cat([model(a[:, 22:], cache=ca).logits, model(b[:, 22:], cache=cb).logits])
        want = model(torch.cat([a, b])).logits[:, -1:]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _tokenizer_model():
    from frugallm.tokenizer import train_tokenizer

    tok = train_tokenizer(iter(["the cat sat on a mat and the dog ran to the park with a ball " * 50]), 290)
    torch.manual_seed(0)
    m = Transformer(_cfg(vocab_size=tok.vocab_size, n_mtp=0, layer_types=KINDS)).eval()
    with torch.no_grad():
        m.head.weight.mul_(20)
    return tok, m


def _serve(model, tok, specs: list[dict], **engine_args) -> list[list[int]]:
    """Each job's generated token ids (from its log-prob records), all jobs submitted at once."""
    from frugallm.infer.engine import Engine, Job

    async def run():
        engine = Engine(model, tok, **engine_args)
        try:
            jobs = [engine.submit(Job(**spec, logprobs=0)) for spec in specs]
            out = []
            for job in jobs:
                ids = []
                while (event := await job.queue.get())[0] == "text":
                    ids += [record[0] for record in event[2]]
                assert event[0] == "done", event
                out.append(ids)
            return out
        finally:
            engine.close()

    return asyncio.run(run())


def test_engine_serves_hybrid_models_as_generate():
    """Continuous batching with per-request HybridCaches: prompts of three lengths (joining, prefilled 4
    tokens a step, decoded in one forward per length: caches stacked) give generate's tokens, one slot or five."""
    tok, m = _tokenizer_model()
    words = "the cat sat on a mat and the dog ran to the park with a ball".split()
    prompts = [[tok.bos_id, *tok.encode(" ".join(words[:2 + 3 * (i % 3)]))] for i in range(5)]
    specs = [dict(prompt=p, max_tokens=20, temperature=0.0) for p in prompts]
    want = [g[:g.index(tok.eos_id)] if tok.eos_id in g else g for g in generate(m, prompts, 20).tolist()]
    assert len({len(p) for p in prompts}) == 3 and sum(map(len, want)) > 60
    for slots in (1, 5):
        assert _serve(m, tok, specs, slots=slots, prefill_chunk=4) == want, slots


def test_prepacked_weights_decode_as_their_full_forward(model):
    """The bf16 prepacked twins (kernels/prepack.py, what generate / serve load on a bf16 host) run the
    hybrid blocks' linears: cached greedy decoding equals the same prepacked model's full forward."""
    import copy

    from frugallm.kernels.prepack import prepack, unavailable_reason

    m = copy.deepcopy(model).to(torch.bfloat16)
    if unavailable_reason(m):
        pytest.skip(unavailable_reason(m))
    assert prepack(m)
    got = generate(m, _prompts()[:2], 16).tolist()
    assert got == [_greedy_full(m, p, g) for p, g in zip(_prompts()[:2], got)]


def test_compiled_decoder_is_refused_for_hybrid_models(model):
    from frugallm.infer.engine import Engine
    from frugallm.kernels.compiled import unavailable_reason

    assert "without --compile" in unavailable_reason(model)  # what plan.apply / --compile meets first
    with pytest.raises(ValueError, match="without --compile"):
        generate(model, _prompts(), 4, decoder=object())
    with pytest.raises(ValueError, match="without --compile"):
        Engine(model, None, decoder=object())


@pytest.mark.parametrize("T", [1, 3, 4, 7, 8, 9, 17, 40])
def test_info_bytes_count_what_the_cache_holds(model, T):
    """hybrid_values (frugallm info's bytes per token) equals the values HybridCache holds after T tokens,
    open windows included."""
    cfg = model.config
    with torch.no_grad():
        cache = HybridCache(cfg, 1)
        model(torch.randint(0, 61, (1, T)), cache=cache)
    assert cache.held_values() == sum(hybrid_values(cfg, T).values())


def test_info_reports_bytes_per_token_at_1k_32k_and_1m(capsys):
    from frugallm.cli import main

    assert main(["info", "--preset", "tiny-v4", "--max-build-params", "0"]) == 0
    out = capsys.readouterr().out
    for T in ("1,024", "32,768", "1,048,576"):
        assert re.search(rf"{T} tokens\s+[\d,.]+ B/token \(window", out), out


# --- against transformers' DeepseekV4ForCausalLM.generate (no download: a tiny config of the test's own), its
# weights loaded into frugallm through the saved directory, as frugallm.load opens any deepseek_v4 one

hf_v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
HF_KINDS = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}

def _hf_pair():
    from transformers import DeepseekV4Config

    hf = DeepseekV4Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, head_dim=16, partial_rotary_factor=0.5,
        q_lora_rank=24, o_groups=2, o_lora_rank=12, sliding_window=WIN, layer_types=[HF_KINDS[k] for k in KINDS],
        index_n_heads=4, index_head_dim=12, index_topk=3, compress_rates={HF_KINDS["csa"]: CSA, HF_KINDS["hca"]: HCA},
        max_position_embeddings=128, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, routed_scaling_factor=1.5, swiglu_limit=10.0, mlp_layer_types=["hash_moe", "moe", "moe"],
        hc_mult=4, hc_eps=1e-6, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                         "beta_fast": 32, "beta_slow": 1})
    hf._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = hf_v4.DeepseekV4ForCausalLM(hf).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking values: visible sinks, slot biases, mHC and a sharp head
        for name, p in theirs.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))
        theirs.lm_head.weight.mul_(4)
        for m in theirs.modules():
            if hasattr(m, "tid2eid"):
                m.tid2eid.copy_(torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(64)]))
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1, generator=g)
    return theirs


def _load_ours(theirs, path):
    """transformers' save_pretrained directory, opened as `frugallm.load` opens any deepseek_v4 one (formats/)."""
    import warnings

    import frugallm

    theirs.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers writes no MTP layer: loaded with n_mtp=0, as it says
        return frugallm.load(path).float().eval()


def test_greedy_generation_equals_transformers_generate_with_cache(tmp_path):
    """11 prompt tokens + 32 new: past the window of 8, 10 CSA entries (> top-3), 5 HCA entries. transformers
    decodes with its DynamicCache (DeepseekV4 CSA / HCA cache layers), frugallm with HybridCache; the tokens
    agree, and each side's cached decode agrees with its own full forward."""
    theirs = _hf_pair()
    ours = _load_ours(theirs, tmp_path / "hf")
    assert ours.config.attention == "hybrid" and ours.config.layer_types == KINDS
    prompt = torch.randint(0, 64, (1, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = theirs.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True,
                               attention_mask=torch.ones_like(prompt))[0, 11:].tolist()
        full = theirs(torch.cat([prompt, torch.tensor([want])], 1)).logits[0, 10:-1].argmax(-1).tolist()
        seq = torch.cat([prompt, torch.tensor([want])], 1)
        logits_ours, logits_theirs = ours(seq).logits, theirs(seq).logits
    got = generate(ours, prompt, 32).tolist()[0]
    assert full == want  # transformers' cached generate = its own full forward
    assert (logits_ours - logits_theirs).abs().max() <= 1e-5 * logits_theirs.abs().max()
    assert got == want
