"""DeepSeek-V4's MoE changes against transformers' deepseek_v4 modules, directly: sqrtsoftplus scores
without groups, hash routing by a frozen token-id table, and the clamped SwiGLU of the routed and the
shared experts (model/moe.py), through every routed-experts twin (kernels/)."""

import pytest
import torch

from frugallm import Transformer
from frugallm.kernels.experts import GroupedExperts, dense_experts, gathered_experts
from frugallm.model.moe import MoE, hash_table, update_expert_bias

from conftest import tiny_config

hf_v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
from transformers import DeepseekV4Config  # noqa: E402

E, K, D, I, V = 8, 2, 16, 12, 50
LIMIT = 0.3  # small, so that the clamps bite on these random weights


def _configs(hashed: bool):
    hf = DeepseekV4Config(vocab_size=V, hidden_size=D, moe_intermediate_size=I, num_hidden_layers=2,
                          n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1, routed_scaling_factor=1.5,
                          swiglu_limit=LIMIT, mlp_layer_types=["hash_moe" if hashed else "moe", "moe"])
    ours = tiny_config(vocab_size=V, dim=D, moe_inter_dim=I, n_layers=2, n_dense_layers=0, n_routed_experts=E,
                       n_activated_experts=K, n_shared_experts=1, route_scale=1.5, n_expert_groups=1,
                       n_limited_groups=1, score_func="sqrtsoftplus", swiglu_limit=LIMIT, n_hash_layers=int(hashed))
    return hf, ours


def _pair(hashed: bool):
    hf_cfg, cfg = _configs(hashed)
    torch.manual_seed(0)
    theirs = hf_v4.DeepseekV4SparseMoeBlock(hf_cfg, 0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.5)
        if hashed:
            theirs.gate.tid2eid.copy_(torch.stack([torch.randperm(E)[:K] for _ in range(V)]))
        else:
            theirs.gate.e_score_correction_bias.normal_(0, 0.3)
    ours = MoE(cfg, hashed).eval()
    gu, g = theirs.experts.gate_up_proj.detach(), theirs.gate
    sh = theirs.shared_experts
    state = {"experts.w1": gu[:, :I], "experts.w3": gu[:, I:], "experts.w2": theirs.experts.down_proj.detach(),
             "gate.weight": g.weight.detach(), "shared_experts.w1.weight": sh.gate_proj.weight.detach(),
             "shared_experts.w2.weight": sh.down_proj.weight.detach(), "shared_experts.w3.weight": sh.up_proj.weight.detach()}
    state.update({"gate.tid2eid": g.tid2eid} if hashed else {"gate.bias": g.e_score_correction_bias})
    ours.load_state_dict(state)
    return theirs, ours


@pytest.mark.parametrize("hashed", [False, True])
def test_moe_block_equals_transformers(hashed):
    theirs, ours = _pair(hashed)
    x, ids = torch.randn(2, 7, D), torch.randint(0, V, (2, 7))
    with torch.no_grad():
        want = theirs(x, ids) if hashed else theirs(x)
        got, _ = ours(x, ids)
        _, w_t, i_t = theirs.gate(x, ids) if hashed else theirs.gate(x)
        w_o, i_o, _ = ours.gate(x.reshape(-1, D), ids.reshape(-1))
    dense = lambda w, i: torch.zeros(w.shape[0], E).scatter(1, i, w.float())  # order-free comparison
    assert torch.allclose(dense(w_o, i_o), dense(w_t, i_t), atol=1e-6)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    if hashed:
        assert ours.gate.bias is None and torch.equal(i_o, theirs.gate.tid2eid[ids.reshape(-1)])


def test_clamped_swiglu_in_every_experts_twin():
    """The reference loop, the grouped GEMMs (and their small-batch fallback), and the compiled decode
    twins (gathered, dense) all clamp as transformers' experts do; so does the shared MLP."""
    theirs, ours = _pair(False)
    x = torch.randn(9, D) * 4  # large activations: most gate/up values are clamped
    with torch.no_grad():
        w, idx, _ = ours.gate(x)
        want = theirs.experts(x, idx, w)
        e = ours.experts
        assert torch.allclose(e(x, w, idx), want, rtol=1e-5, atol=1e-6)
        grouped = GroupedExperts.from_experts(e)
        assert grouped.limit == LIMIT
        for got in (grouped(x, w, idx), grouped(x[:1], w[:1], idx[:1]),  # 2 pairs < 8 experts: the fallback
                    gathered_experts(x, w, idx, e.w1, e.w2, e.w3, LIMIT), dense_experts(x, w, idx, e.w1, e.w2, e.w3, LIMIT)):
            assert torch.allclose(got, want[: got.shape[0]], rtol=1e-5, atol=1e-5)
        assert torch.allclose(ours.shared_experts(x), theirs.shared_experts(x), rtol=1e-5, atol=1e-6)
        unclamped = e.__class__(E, D, I)
        unclamped.load_state_dict(e.state_dict())
        assert not torch.allclose(unclamped(x, w, idx), want, atol=1e-3)  # the clamp matters here


def test_hash_layers_are_not_balanced_and_a_model_trains_and_decodes():
    cfg = tiny_config(n_dense_layers=0, n_hash_layers=1, score_func="sqrtsoftplus", swiglu_limit=7.0,
                      n_expert_groups=1, n_limited_groups=1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    hashed = [m for m in model.modules() if isinstance(m, MoE) and m.gate.tid2eid is not None]
    assert len(hashed) == 1 and hashed[0].gate.bias is None
    assert "layers.0.ffn.gate.tid2eid" in model.state_dict()  # saved and loaded with the weights
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, cfg.vocab_size, (4, 33))
    losses = []
    for _ in range(6):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        update_expert_bias(model, 1e-3)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(hashed[0].gate.tid2eid, hash_table(cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts))
    model.eval()
    prompt = ids[:1, :5]
    with torch.no_grad():
        from frugallm import generate

        new = generate(model, prompt, 8, temperature=0.0)  # cached decode: each step routes by its own id
        seq = prompt
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert new.tolist() == seq[:, 5:].tolist()


def test_hash_table_spreads_ids_evenly_over_distinct_experts():
    t = hash_table(4096, 16, 4)
    assert t.shape == (4096, 4) and all(len(set(row.tolist())) == 4 for row in t)
    load = torch.bincount(t.flatten(), minlength=16)
    assert load.max() / load.float().mean() < 1.1


@pytest.mark.parametrize("changes, message", [
    (dict(n_hash_layers=9), "n_hash_layers=9 must be in"), (dict(swiglu_limit=-1.0), "swiglu_limit=-1.0 must be >= 0"),
    (dict(score_func="relu"), "score_func")])
def test_bad_v4_moe_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**changes)
