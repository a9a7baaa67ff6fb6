"""DeepSeekMoE: gate semantics, grouped == loop, balance loss, MaxVio, the bias update."""

import pytest
import torch

from frugallm import Transformer
from frugallm.kernels.experts import GroupedExperts, use_grouped_experts
from frugallm.model.moe import Gate, MoE, max_violation, sequence_balance_loss, update_expert_bias
from frugallm.train.optim import ExpertBiasUpdate

from conftest import tiny_config


def test_grouped_equals_loop_forward_and_backward():
    cfg = tiny_config(n_routed_experts=16, n_activated_experts=4)
    moe = MoE(cfg)
    Transformer(cfg)  # same init routine as the model
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.bias.normal_()
    x = torch.randn(3, 11, cfg.dim, requires_grad=True)
    outs, grads = [], []
    for grouped in (False, True):
        use_grouped_experts(moe, grouped)
        assert isinstance(moe.experts, GroupedExperts) == grouped
        moe.zero_grad()
        x.grad = None
        y, _ = moe(x)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.gate.weight)])
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    assert rel(outs[1], outs[0]) < 1e-6
    for a, b in zip(*grads):
        assert rel(b, a) < 1e-5


def test_grouped_equals_loop_float64_fallback():
    cfg = tiny_config()
    moe = MoE(cfg).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 9, cfg.dim, dtype=torch.float64)
    loop, _ = moe(x)
    use_grouped_experts(moe)
    grouped, _ = moe(x)
    assert torch.allclose(loop, grouped, rtol=1e-12, atol=1e-14)


def test_weights_are_unbiased_scores_and_bias_only_selects():
    cfg = tiny_config(n_expert_groups=1, n_limited_groups=1, n_routed_experts=8, n_activated_experts=2)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(5, cfg.dim)
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 100.0, 100.0]))  # |b| >> s forces experts 6, 7
    w, idx, scores = gate(x)
    assert (idx.sort(-1).values == torch.tensor([6, 7])).all()
    s = torch.sigmoid(x @ gate.weight.T)
    expected = s[:, 6:8] / s[:, 6:8].sum(-1, keepdim=True) * cfg.route_scale  # never (s + b) - b
    assert torch.allclose(w.sort(-1).values, expected.sort(-1).values, rtol=1e-6)
    assert not gate.bias.requires_grad and "bias" not in dict(gate.named_parameters())


def test_masked_groups_are_minus_inf_with_all_negative_biased_scores():
    cfg = tiny_config(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=2)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()  # every sigmoid score = 0.5
        gate.bias.copy_(torch.tensor([-5.0, -5.0, -9, -9, -1.0, -1.2, -9, -9]))  # group 2 wins; all scores < 0
    _, idx, _ = gate(torch.randn(4, cfg.dim))
    # a 0-fill would let the masked groups (score 0 > -0.5) win; -inf keeps only group 2's experts
    assert (idx.sort(-1).values == torch.tensor([4, 5])).all()


def test_softmax_gate_without_renormalisation():
    cfg = tiny_config(score_func="softmax", group_score="max", gate_bias=False, norm_topk_prob=False, route_scale=1.0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight)
    w, idx, scores = gate(torch.randn(6, cfg.dim))
    assert gate.bias is None
    assert torch.allclose(scores.sum(-1), torch.ones(6))
    assert torch.allclose(w, scores.gather(1, idx))


def test_bias_stays_float32_under_dtype_casts():
    model = Transformer(tiny_config()).to(torch.bfloat16)
    biases = [m.gate.bias for m in model.modules() if isinstance(m, MoE)]
    assert biases and all(b.dtype == torch.float32 for b in biases)
    assert model.layers[1].ffn.experts.w1.dtype == torch.bfloat16


def test_balance_loss_is_alpha_at_perfect_balance():
    cfg = tiny_config(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2,
                      balance_loss_alpha=1e-4)
    S = 8
    idx = torch.tensor([[0, 1], [2, 3]] * (S // 2)).unsqueeze(0)  # each expert chosen S*K/E times
    scores = torch.full((1, S, 4), 0.3)  # uniform renormalised scores: P_i = 1/E
    assert sequence_balance_loss(scores, idx, cfg).item() == pytest.approx(1e-4, rel=1e-6)
    skewed = torch.tensor([[0, 1]] * S).unsqueeze(0)
    assert sequence_balance_loss(scores, skewed, cfg).item() == pytest.approx(1e-4, rel=1e-6)  # uniform P
    peaked = scores.clone()
    peaked[..., :2] = 0.9
    assert sequence_balance_loss(peaked, skewed, cfg).item() > 1e-4


def test_max_violation_golden():
    assert max_violation(torch.tensor([130.0, 90, 100, 80])) == pytest.approx(0.30)


def test_bias_update_sign_rule():
    cfg = tiny_config(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=1)
    model = Transformer(cfg)
    moe = model.layers[1].ffn
    moe.tokens_per_expert.copy_(torch.tensor([130, 90, 100, 80]))  # mean 100
    other = model.layers[2].ffn
    other.tokens_per_expert.copy_(torch.tensor([1, 1, 1, 1]))
    vios = update_expert_bias(model, gamma=1e-3)
    assert moe.gate.bias.tolist() == pytest.approx([-1e-3, 1e-3, 0.0, 1e-3])  # at the mean: unchanged
    assert other.gate.bias.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert vios[0] == pytest.approx(0.30) and vios[1] == 0.0
    assert moe.tokens_per_expert.sum() == 0  # counters reset for the next step


def test_training_forward_counts_load_and_eval_does_not():
    cfg = tiny_config()
    model = Transformer(cfg)
    ids = torch.randint(0, 97, (2, 10))
    model.eval()
    with torch.no_grad():
        model(ids)
    assert all(m.tokens_per_expert.sum() == 0 for m in model.modules() if isinstance(m, MoE))
    model.train()
    model(ids, targets=ids)
    model(ids, targets=ids)  # two micro-batches accumulate
    assert model.layers[1].ffn.tokens_per_expert.sum() == 2 * 20 * cfg.n_activated_experts


def test_bias_hook_runs_once_per_optimizer_step_and_freezes():
    cfg = tiny_config()
    model = Transformer(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    hook = ExpertBiasUpdate(model, gamma=0.01, freeze_after_tokens=40)
    hook.attach(opt)
    ids = torch.randint(0, 97, (2, 10))
    model.train()
    for _ in range(2):  # gradient accumulation: two forwards, one step
        model(ids, targets=ids).loss.backward()
    assert model.layers[1].ffn.gate.bias.abs().sum() == 0  # nothing before the step
    opt.step()
    assert hook.tokens_seen == 40
    changed = model.layers[1].ffn.gate.bias.clone()
    assert changed.abs().max() == pytest.approx(0.01)
    model(ids, targets=ids).loss.backward()
    opt.step()  # 60 tokens >= 40: gamma scheduled to 0
    assert torch.equal(model.layers[1].ffn.gate.bias, changed)
    assert len(hook.last_max_violation) == cfg.n_layers - cfg.n_dense_layers + cfg.n_mtp


def test_bias_gets_no_gradient_and_is_not_an_optimizer_parameter():
    model = Transformer(tiny_config())
    model.train()
    ids = torch.randint(0, 97, (2, 10))
    model(ids, targets=ids).loss.backward()
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("gate.bias") for n in names)
    assert model.layers[1].ffn.gate.weight.grad is not None  # the router itself is trained


def test_compiled_model_equals_eager_in_fp32():
    """The grouped experts compile in fp32 (frugallm::grouped_mm is opaque to torch.compile, whose
    own _grouped_mm meta kernel takes bf16 only), forward and backward, in one graph."""
    import torch._dynamo

    model = Transformer(tiny_config()).train()
    use_grouped_experts(model)
    ids = torch.randint(0, 97, (2, 16))
    eager = model(ids, targets=ids).loss
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, targets=ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True)(ids, targets=ids).loss
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-5)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), n


def test_checkpoints_from_before_routed_experts_was_a_module_still_load(cfg):
    """Old state dicts named the routed experts `ffn.w1` (and their optimizer state likewise)."""
    from frugallm.model.moe import upgrade_expert_name
    from frugallm.model.transformer import Transformer

    assert upgrade_expert_name("layers.1.ffn.w1") == "layers.1.ffn.experts.w1"
    assert upgrade_expert_name("mtp.0.block.ffn.w2_scale_inv") == "mtp.0.block.ffn.experts.w2_scale_inv"
    for name in ("layers.0.ffn.w1.weight", "layers.1.ffn.experts.w3", "layers.1.ffn.shared_experts.w1.weight"):
        assert upgrade_expert_name(name) == name
    model = Transformer(cfg)
    old = {k.replace("ffn.experts.", "ffn."): v for k, v in model.state_dict().items()}
    assert "layers.1.ffn.w1" in old
    fresh = Transformer(cfg)
    fresh.load_state_dict(old)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
