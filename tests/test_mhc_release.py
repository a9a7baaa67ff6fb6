"""mHC as DeepSeek-V4 ships it (hc_form = "release"; docs/design/hyper-connections.md, "As V4 ships it"):
the coefficients, Sinkhorn, stream mixing and hyper head against transformers' DeepseekV4 modules
themselves, forward and backward in fp32; the config field; a tiny model that trains and decodes."""

import pytest
import torch
from torch import nn

from frugallm import ModelConfig, Transformer
from frugallm.infer import KVCache
from frugallm.model.hyperconn import static_parameters
from frugallm.model.mhc_release import (HyperHead, ReleaseManifoldHyperConnection, sinkhorn_release,
                                        sinkhorn_release_loop)

from conftest import tiny_config

N, C = 4, 16  # streams, width of the module tests
# eps values far above the release's 1e-6 on both sides, so that where each eps goes is visible at 1e-6
HC_EPS, NORM_EPS = 1e-2, 1e-3


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def v4():
    """transformers' DeepseekV4 modeling module and a tiny config of its own (no download)."""
    mod = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    cfg = mod.DeepseekV4Config(hidden_size=C, num_hidden_layers=2, hc_mult=N, hc_sinkhorn_iters=20, hc_eps=HC_EPS,
                               rms_norm_eps=NORM_EPS)
    return mod, cfg


def _ours(residual="mhc", **kw):
    return tiny_config(dim=C, residual=residual, hc_form="release", hc_streams=N, hc_eps=HC_EPS, norm_eps=NORM_EPS,
                       **kw)


def _randomise(*params, gen):
    """Trained-looking values: visibly token-dependent coefficients, far from the uniform init."""
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 2 else 1.0))


def _connection_pair(v4, gen):
    mod, cfg = v4
    theirs = mod.DeepseekV4HyperConnection(cfg)
    _randomise(theirs.fn, theirs.base, theirs.scale, gen=gen)
    ours = ReleaseManifoldHyperConnection(_ours(), k=0)
    with torch.no_grad():  # the release's tensors copy unchanged (mhc_release.py)
        ours.phi.copy_(theirs.fn)
        ours.alpha.copy_(theirs.scale)
        ours.b_pre.copy_(theirs.base[:N])
        ours.b_post.copy_(theirs.base[N:2 * N])
        ours.b_res.copy_(theirs.base[2 * N:].view(N, N))
    return theirs, ours


def _their_grads(theirs):
    return [theirs.fn.grad, theirs.base.grad, theirs.scale.grad]


def _our_grads(ours):
    return [ours.phi.grad, torch.cat([ours.b_pre.grad, ours.b_post.grad, ours.b_res.grad.flatten()]), ours.alpha.grad]


def test_coefficients_and_sinkhorn_equal_transformers_forward_and_backward(v4):
    """post, Comb (Sinkhorn) and the collapsed input against DeepseekV4HyperConnection, with
    H_res = Comb^T; the gradients through all three, to the input and to fn, base and scale."""
    gen = torch.Generator().manual_seed(0)
    theirs, ours = _connection_pair(v4, gen)
    x = (torch.randn(2, 5, N, C, generator=gen) * 3).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    post, comb, collapsed = theirs(x)
    mix = ours(x2)
    h_pre, h_post, h_res = ours.coefficients(x2.detach())
    assert _rel(mix.h_post, post) <= 1e-6 and _rel(mix.h, collapsed) <= 1e-6
    assert _rel(mix.h_res, comb.transpose(-1, -2)) <= 1e-6
    assert comb.std() > 0.05  # far from the uniform matrix: Sinkhorn's orientation is visible
    assert torch.allclose(h_res.sum(-1), torch.ones(2, 5, N), atol=2 * HC_EPS)  # exact forward gain, up to eps
    g_post, g_comb, g_col = (torch.randn(t.shape, generator=gen) for t in (post, comb, collapsed))
    (post * g_post).sum().add((comb * g_comb).sum()).add((collapsed * g_col).sum()).backward()
    (mix.h_post * g_post).sum().add((mix.h_res * g_comb.transpose(-1, -2)).sum()).add((mix.h * g_col).sum()).backward()
    assert _rel(x2.grad, x.grad) <= 1e-5
    for g, ref in zip(_our_grads(ours), _their_grads(theirs)):
        assert _rel(g, ref) <= 1e-5


def test_release_sinkhorn_gradient_and_rows():
    """The recompute backward against autograd through the loop (fp64 gradcheck); rows sum to 1 - O(eps)."""
    logits = torch.randn(6, N, N, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: sinkhorn_release(l, 20, 1e-6), (logits,))
    logits = (torch.randn(3, 7, N, N) * 2).requires_grad_()
    grad = torch.randn(3, 7, N, N)
    assert torch.equal(sinkhorn_release(logits, 20, 1e-6), sinkhorn_release_loop(logits, 20, 1e-6))
    (g,) = torch.autograd.grad(sinkhorn_release(logits, 20, 1e-6), logits, grad)
    (ref,) = torch.autograd.grad(sinkhorn_release_loop(logits, 20, 1e-6), logits, grad)
    assert _rel(g, ref) <= 1e-5
    p = sinkhorn_release(torch.zeros(N, N), 1, 0.0)
    assert torch.allclose(p, torch.full((N, N), 1 / N))


class _Linear(nn.Module):
    """A stand-in sub-layer: transformers' attention returns (out, weights), its MoE block takes input_ids."""

    def __init__(self, returns_pair: bool):
        super().__init__()
        self.lin, self.pair = nn.Linear(C, C), returns_pair

    def forward(self, x, input_ids=None, **kwargs):
        y = self.lin(x)
        return (y, None) if self.pair else y


def test_stream_mixing_equals_transformers_decoder_layer(v4):
    """Both half-blocks of DeepseekV4DecoderLayer (its own HC modules, norms and mixing code) with
    linear sub-layers, against our read / write around the same sub-layers and norms."""
    mod, cfg = v4
    gen = torch.Generator().manual_seed(1)
    layer = mod.DeepseekV4DecoderLayer(cfg, layer_idx=0)
    layer.self_attn, layer.mlp = _Linear(True), _Linear(False)
    ours = []
    for hc in (layer.attn_hc, layer.ffn_hc):
        _randomise(hc.fn, hc.base, hc.scale, gen=gen)
        conn = ReleaseManifoldHyperConnection(_ours(), k=0)
        with torch.no_grad():
            conn.phi.copy_(hc.fn), conn.alpha.copy_(hc.scale)
            for p, b in zip((conn.b_pre, conn.b_post, conn.b_res), hc.base.split([N, N, N * N])):
                p.copy_(b.view(p.shape))
        ours.append(conn)
    x = torch.randn(2, 6, N, C, generator=gen, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref = layer(x)
    h = x2
    for conn, norm, f in zip(ours, (layer.input_layernorm, layer.post_attention_layernorm), (layer.self_attn.lin,
                                                                                              layer.mlp.lin)):
        mix = conn(h)
        h = conn.write(mix, f(norm(mix.h)))
    assert _rel(h, ref) <= 1e-6
    g = torch.randn(ref.shape, generator=gen)
    (ref * g).sum().backward()
    lin_grads = [p.grad.clone() for p in (*layer.self_attn.parameters(), *layer.mlp.parameters())]
    for p in (*layer.self_attn.parameters(), *layer.mlp.parameters()):
        p.grad = None
    (h * g).sum().backward()
    assert _rel(x2.grad, x.grad) <= 1e-5
    for conn, hc in zip(ours, (layer.attn_hc, layer.ffn_hc)):
        for a, b in zip(_our_grads(conn), _their_grads(hc)):
            assert _rel(a, b) <= 1e-5
    for a, b in zip((p.grad for p in (*layer.self_attn.parameters(), *layer.mlp.parameters())), lin_grads):
        assert _rel(a, b) <= 1e-5


def test_hyper_head_equals_transformers_forward_and_backward(v4):
    mod, cfg = v4
    gen = torch.Generator().manual_seed(2)
    theirs = mod.DeepseekV4HyperHead(cfg)
    _randomise(theirs.hc_fn, theirs.hc_base, theirs.hc_scale, gen=gen)
    ours = HyperHead(_ours())
    with torch.no_grad():
        ours.phi.copy_(theirs.hc_fn), ours.b_pre.copy_(theirs.hc_base), ours.alpha.copy_(theirs.hc_scale)
    x = (torch.randn(3, 4, N, C, generator=gen) * 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ref, out = theirs(x), ours(x2)
    assert out.shape == (3, 4, C) and _rel(out, ref) <= 1e-6
    g = torch.randn(ref.shape, generator=gen)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    assert _rel(x2.grad, x.grad) <= 1e-5
    for a, b in [(ours.phi, theirs.hc_fn), (ours.b_pre, theirs.hc_base), (ours.alpha, theirs.hc_scale)]:
        assert _rel(a.grad, b.grad) <= 1e-5


def test_hc_form_validates_and_round_trips(tmp_path):
    assert ModelConfig().hc_form == "paper"
    cfg = tiny_config(residual="mhc", hc_form="release", hc_eps=1e-5)
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    for bad, msg in [(dict(residual="mhc", hc_form="v4"), r"hc_form='v4' must be one of \('paper', 'release'\)"),
                     (dict(residual="hc", hc_form="release"), "hc_form='release' is a form of mHC but "
                                                              "residual='hc'; set residual='mhc' or hc_form='paper'"),
                     (dict(hc_form="release"), "residual='plain'"),
                     (dict(residual="mhc", hc_form="release", hc_eps=-1e-6), "hc_eps=-1e-06 must be >= 0")]:
        with pytest.raises(ValueError, match=msg):
            tiny_config(**bad)


def _loss(model, ids):
    return model(ids, targets=ids.roll(-1, 1)).loss


def test_tiny_release_model_trains():
    torch.manual_seed(0)
    model = Transformer(tiny_config(residual="mhc", hc_form="release")).train()
    assert isinstance(model.layers[0].attn_conn, ReleaseManifoldHyperConnection) and model.hc_head is not None
    assert len(static_parameters(model)) == 3 * 2 * (model.config.n_layers + model.config.n_mtp) + 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 16))
    losses = []
    for _ in range(8):
        loss = _loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
    for name, p in model.named_parameters():
        if "conn." in name or "hc_head." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("dynamic", [True, False])
def test_release_cached_decode_equals_full_forward(dynamic):
    cfg = tiny_config(residual="mhc", hc_form="release", hc_dynamic=dynamic)
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():  # static biases off their zero init, so the forms' differences show
        for name, p in model.named_parameters():
            if name.endswith(("b_pre", "b_post", "b_res")):
                p.normal_()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(cfg, batch_size=2, dtype=torch.float64)
        steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                           for t in range(5, 12)]
    assert _rel(torch.cat(steps, 1), full) <= 1e-10
