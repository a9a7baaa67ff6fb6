"""MTP: alignment (the FlagScale #337 off-by-one), separate losses, shared embedding and head."""

import torch

from frugallm import Transformer
from frugallm.model.mtp import mtp_logits

from conftest import tiny_config


def _two_chain_stream(batch: int, length: int, perm: torch.Tensor) -> torch.Tensor:
    """t_{i+2} = perm[t_i]; t_0 and t_1 random, so the even and odd chains are independent and
    t_{i+2} is NOT a function of t_{i+1}: depth 1 must use h_i (which saw t_i)."""
    t = torch.empty(batch, length, dtype=torch.long)
    t[:, :2] = torch.randint(0, len(perm), (batch, 2))
    for i in range(2, length):
        t[:, i] = perm[t[:, i - 2]]
    return t


def test_depth1_module_learns_t_plus_2_rule():
    V = 32
    cfg = tiny_config(vocab_size=V, n_mtp=1, mtp_lambda=1.0, n_layers=2, max_seq_len=32)
    model = Transformer(cfg)
    perm = torch.randperm(V)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        ids = _two_chain_stream(16, 24, perm)
        out = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    ids = _two_chain_stream(8, 24, perm)
    x = ids[:, :-1]
    S = x.shape[1]
    with torch.no_grad():
        out = model(x)
        cos, sin = model.rope_cos[:S], model.rope_sin[:S]
        [(logits, _)] = mtp_logits(model.mtp, model.embed, model.head, out.hidden, x, cos=cos, sin=sin)
    # depth-1 logits at position i predict t_{i+2} = perm[t_i], for positions with a real t_{i+1}
    pred = logits[:, : S - 1].argmax(-1)
    accuracy = (pred == perm[x[:, : S - 1]]).float().mean().item()
    assert accuracy > 0.95, accuracy


def test_losses_returned_separately_and_summed():
    cfg = tiny_config(mtp_lambda=0.3)
    model = Transformer(cfg).train()
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, targets=ids.roll(-1, 1))
    assert torch.allclose(out.loss, out.lm_loss + out.mtp_loss + out.balance_loss)
    half = model(ids, targets=ids.roll(-1, 1), mtp_lambda=0.15).mtp_loss
    assert torch.allclose(half * 2, out.mtp_loss, rtol=1e-5)
    assert out.mtp_loss / 0.3 > 0


def test_gradients_reach_shared_embedding_and_head_from_both_losses():
    model = Transformer(tiny_config()).train()
    assert model.mtp[0].block is not None and not hasattr(model.mtp[0], "embed")  # shared, not copied
    ids = torch.randint(0, 97, (2, 12))
    for part in ("lm_loss", "mtp_loss"):
        model.zero_grad()
        getattr(model(ids, targets=ids.roll(-1, 1)), part).backward()
        assert model.embed.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
        mtp_grad = model.mtp[0].eh_proj.weight.grad
        assert (mtp_grad is not None and mtp_grad.abs().sum() > 0) == (part == "mtp_loss")


def test_zero_modules_disable_mtp():
    model = Transformer(tiny_config(n_mtp=0)).train()
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, targets=ids.roll(-1, 1))
    assert out.mtp_loss is None and len(model.mtp) == 0


def test_eh_proj_takes_embedding_first():
    """The released V3 eh_proj expects cat[enorm(emb), hnorm(h)] (docs/design/mtp.md)."""
    cfg = tiny_config(n_dense_layers=3, n_layers=3)
    module = Transformer(cfg).mtp[0]
    with torch.no_grad():
        module.eh_proj.weight.zero_()
        module.eh_proj.weight[:, : cfg.dim] = torch.eye(cfg.dim)  # pass through the first half only
    seen = {}
    module.block.register_forward_pre_hook(lambda m, args, kw: seen.update(x=args[0]), with_kwargs=True)
    emb, h = torch.randn(1, 3, cfg.dim), torch.randn(1, 3, cfg.dim)
    cos, sin = torch.ones(3, cfg.qk_rope_head_dim // 2), torch.zeros(3, cfg.qk_rope_head_dim // 2)
    module(h, emb, cos=cos, sin=sin)
    assert torch.allclose(seen["x"], module.enorm(emb))
