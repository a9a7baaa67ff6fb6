"""DSA training (DeepSeek-V3.2 §2.1.1): the indexer's KL loss, the dense warm-up, the sparse stage's separate
gradients, inference computing none of it, and `--init-from` adding fresh indexers to a dense run.
(Exact resume after SIGKILL in both stages: tests/test_train.py test_resume_is_bit_identical.)"""

import math

import pytest
import torch

from frugallm.cli import main
from frugallm.formats import checkpoint
from frugallm.model.attention import causal_mask
from frugallm.model.indexer import Indexer, set_dsa_stage
from frugallm.model.indexer_loss import attention_target, indexer_kl
from frugallm.model.transformer import Transformer
from frugallm.plan import load
from frugallm.train.optim import build_optimizer

from conftest import tiny_config

# init_std 0.1: attention and index scores far from uniform, so the KL is far from 0; 20 tokens > top-k 6
DSA = dict(index_topk=6, index_n_heads=2, index_head_dim=16, init_std=0.1)


def _model(stage):
    torch.manual_seed(0)
    model = Transformer(tiny_config(**DSA)).train()
    set_dsa_stage(model, stage)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (2, 20), generator=g), torch.randint(0, 97, (2, 20), generator=g)


def test_kl_by_hand():
    p = torch.tensor([[[0.5, 0.5, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    # q over the two kept keys: (0.5, 0.5) -> 0, whatever the masked key's score
    assert indexer_kl(p, torch.tensor([[[0.0, 0.0, 50.0]]]), mask).item() == 0.0
    # q = (0.75, 0.25): 0.5 log(0.5 / 0.75) + 0.5 log(0.5 / 0.25) = 0.5 log(4 / 3)
    kl = indexer_kl(p, torch.tensor([[[math.log(3.0), 0.0, -7.0]]]), mask)
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)


def test_target_is_a_distribution_and_the_kl_is_zero_on_it():
    torch.manual_seed(0)
    mask = causal_mask(5, 7, 2, "cpu")  # (S, T): query i sees keys 0..i+2
    probs = torch.randn(2, 3, 5, 7).masked_fill(~mask, float("-inf")).softmax(-1)  # (B, H, S, T)
    p = attention_target(probs)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 5))  # one distribution per query
    assert (p[:, ~mask] == 0).all()
    torch.testing.assert_close(p, probs.mean(1))  # each head sums to 1: the L1 norm divides by H
    # the indexer reproducing p (up to a constant per row; anything where masked): KL = 0
    exact = p.log().masked_fill(~mask, 3.0) + torch.randn(2, 5, 1)
    assert indexer_kl(p, exact, mask).abs().item() < 1e-6
    scores = torch.randn(2, 5, 7, requires_grad=True)
    kl = indexer_kl(p, scores, mask)
    q = scores.detach().masked_fill(~mask, float("-inf")).softmax(-1)
    by_hand = torch.where(mask, p * (p / q).log(), 0.0).sum(-1).mean()
    assert kl.item() > 0.1 and kl.item() == pytest.approx(by_hand.item(), rel=1e-5)
    kl.backward()  # d KL / d I = (Softmax(I) - p) on the kept keys, 0 elsewhere, / (B * S) for the mean
    torch.testing.assert_close(scores.grad, (q - p).masked_fill(~mask, 0.0) / 10)


def test_warmup_attends_densely_and_trains_only_the_indexers():
    model, x, y = _model("warmup"), *_batch()
    torch.manual_seed(0)
    dense = Transformer(tiny_config(**{**DSA, "index_topk": 0})).train()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if ".indexer." not in k})
    out = model(x, targets=y)
    assert torch.equal(out.logits, dense(x, targets=y).logits)  # no top-k mask in the warm-up
    assert out.indexer_loss.item() > 0.01 and torch.equal(out.loss, out.lm_loss + out.mtp_loss + out.balance_loss
                                                         + out.indexer_loss)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8)
    losses = []
    for _ in range(3):
        out = model(x, targets=y)
        losses.append(out.indexer_loss.item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".indexer." in k for k in changed), changed
    assert {k for k in changed if "wq_b" in k} == {f"layers.{i}.attn.indexer.wq_b.weight" for i in range(3)} | {
        "mtp.0.block.attn.indexer.wq_b.weight"}  # every layer's indexer learns, the MTP block's too
    assert losses[-1] < losses[0]


def test_sparse_stage_separates_the_gradients():
    model, x, y = _model("sparse"), *_batch()
    out = model(x, targets=y)
    ours = [p for n, p in model.named_parameters() if ".indexer." in n]
    main_params = [p for n, p in model.named_parameters() if ".indexer." not in n]
    lm = out.lm_loss + out.mtp_loss + out.balance_loss
    assert all(g is None for g in torch.autograd.grad(lm, ours, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(out.indexer_loss, main_params, retain_graph=True,
                                                      allow_unused=True))
    assert all(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(out.indexer_loss, ours))
    # the training forward attends to the keys inference attends to (the same top-k)
    torch.testing.assert_close(out.logits, model.eval()(x).logits, rtol=0, atol=0)


def test_inference_computes_no_target():
    model, x, y = _model("sparse"), *_batch()
    model.eval()
    assert model(x, targets=y).indexer_loss is None
    assert all(m.loss is None and m._scores is None for m in model.modules() if isinstance(m, Indexer))
    model.train()
    with pytest.raises(ValueError, match="absorb=False"):
        model(x, targets=y, absorb=True)
    torch.manual_seed(0)
    plain = Transformer(tiny_config(**DSA)).train()  # no stage set: nothing computed in training mode either
    assert plain(x, targets=y).indexer_loss is None
    with pytest.raises(ValueError, match="has none"):
        set_dsa_stage(Transformer(tiny_config()), "warmup")


SMALL = ["dim=64", "n_layers=2", "n_heads=2", "q_lora_rank=16", "kv_lora_rank=32", "qk_nope_head_dim=16",
         "qk_rope_head_dim=8", "v_head_dim=16", "n_routed_experts=8", "n_expert_groups=2", "n_limited_groups=1",
         "n_activated_experts=2", "moe_inter_dim=32", "inter_dim=128", "vocab_size=384", "max_seq_len=64",
         "seq_len=32", "batch_size=4", "tokenizer_train_chars=200000", "warmup_steps=1", "eval_every=100",
         "eval_batches=1", "log_every=1", "sample_tokens=0", "precision=fp32"]
INDEXER = ["index_topk=8", "index_n_heads=2", "index_head_dim=16"]


def test_init_from_a_dense_run_adds_indexers_and_the_warmup_keeps_the_rest(tmp_path, corpus, capsys):
    dense, sparse = tmp_path / "v3", tmp_path / "v32"
    sets = [f"--set={s}" for s in SMALL]
    assert main(["train", "--data", str(corpus), "--out", str(dense), "--steps", "2", "--no-sample", *sets]) == 0
    assert main(["train", "--data", str(corpus), "--out", str(sparse), "--init-from", str(dense), "--steps", "3",
                 "--dsa-stage", "warmup", "--no-sample", *sets, *[f"--set={s}" for s in INDEXER]]) == 0
    assert "indexer weights are new" in capsys.readouterr().out
    before, after = load(dense).state_dict(), load(sparse).state_dict()
    new = {k for k in after if k not in before}
    assert new and all(".indexer." in k for k in new)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # loaded exactly, then frozen (gate biases too)
    assert load(sparse).config.index_topk == 8 and checkpoint.latest(sparse).name == "step_0000003"
    # a model that differs outside index_*: one clear line before anything is written
    code = main(["train", "--data", str(corpus), "--out", str(tmp_path / "bad"), "--init-from", str(dense),
                 "--steps", "1", "--no-sample", *sets, "--set=dim=32"])
    assert code == 2 and "differs from this run's in dim (64 there, 32 here)" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "train_config.json").exists()
