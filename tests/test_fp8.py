"""Fine-grained FP8 (V3 §3.3; docs/design/fp8.md): quantiser golden values, ragged / zero / saturating groups,
the outlier test that proves the fine-grained path is on, Fp8Linear against fp64, the converter's
filter, and a tiny model training with FP8 on."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frugallm.kernels.fp8 import E4M3, act_dequant, act_quant, weight_dequant, weight_quant


# --- an independent re-derivation of the reference quantiser, one element at a time -------------

def ref_e4m3(v: float) -> float:
    """Round a float to the e4m3fn grid (3 mantissa bits, min normal 2^-6, subnormal step 2^-9,
    max 448) with round-half-to-even, after clamping to +-448."""
    a = min(abs(v), 448.0)
    if a == 0:
        return 0.0
    _, e = math.frexp(a)  # a = m * 2^e, m in [0.5, 1): the binade is [2^(e-1), 2^e)
    step = 2.0 ** -9 if a < 2.0 ** -6 else 2.0 ** (e - 1 - 3)
    return math.copysign(round(a / step) * step, v)  # Python's round() is half-to-even


def ref_scale(amax: np.float32, ue8m0: bool) -> np.float32:
    s = np.float32(max(amax, np.float32(1e-4))) / np.float32(448)  # fp32 division, as the kernel
    return np.float32(2.0 ** math.ceil(math.log2(float(s)))) if ue8m0 else s


def ref_quant_group(x: np.ndarray, ue8m0: bool) -> tuple[np.ndarray, np.float32]:
    s = ref_scale(np.abs(x).max(), ue8m0)
    return np.array([ref_e4m3(float(np.float32(v) / s)) for v in x.ravel()]).reshape(x.shape), s


def _golden_input(*shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[-1])  # magnitudes vary along K
    return x


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_golden_bit_for_bit(scale_fmt):
    x = _golden_input(3, 300)  # K = 300: two full tiles and a ragged one of 44
    q, s = act_quant(x, scale_fmt=scale_fmt)
    assert q.dtype == E4M3 and q.shape == (3, 300) and s.dtype == torch.float32 and s.shape == (3, 3)
    xn = x.numpy()
    for i in range(3):
        for t in range(3):
            ref_q, ref_s = ref_quant_group(xn[i, 128 * t:128 * (t + 1)], scale_fmt == "ue8m0")
            assert s[i, t].item() == ref_s
            np.testing.assert_array_equal(q[i, 128 * t:128 * (t + 1)].float().numpy(), ref_q)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_weight_quant_golden_bit_for_bit(scale_fmt):
    w = _golden_input(200, 300) * 0.02  # ragged in both dims: blocks of 128x128, 128x44, 72x128, 72x44
    q, s = weight_quant(w, scale_fmt=scale_fmt)
    assert q.dtype == E4M3 and q.shape == (200, 300) and s.shape == (2, 3)
    wn = w.numpy()
    for r in range(2):
        for c in range(3):
            blk = wn[128 * r:128 * (r + 1), 128 * c:128 * (c + 1)]
            ref_q, ref_s = ref_quant_group(blk, scale_fmt == "ue8m0")
            assert s[r, c].item() == ref_s
            np.testing.assert_array_equal(q[128 * r:128 * (r + 1), 128 * c:128 * (c + 1)].float().numpy(), ref_q)


def test_hand_golden_values():
    # amax 448 -> s = 1 exactly; the cast rounds half to even: 1.0625 -> 1.0, 1.1875 -> 1.25, 0.5 stays
    x = torch.zeros(128)
    x[:4] = torch.tensor([448.0, 1.0625, 1.1875, -0.5])
    q, s = act_quant(x)
    assert s.tolist() == [1.0]
    assert q[:4].float().tolist() == [448.0, 1.0, 1.25, -0.5]
    # ue8m0 rounds the scale UP to a power of two: amax 500 -> 500/448 = 1.116 -> 2; amax 448 -> 1 stays
    assert act_quant(x * 500 / 448, scale_fmt="ue8m0")[1].tolist() == [2.0]
    assert act_quant(x, scale_fmt="ue8m0")[1].tolist() == [1.0]
    assert act_quant(x * 0.25, scale_fmt="ue8m0")[1].tolist() == [0.25]  # exact powers of two stay


def test_all_zero_groups_give_zero_never_nan():
    x = torch.zeros(2, 256)
    x[1, 128:] = torch.randn(128)
    for fmt in (None, "ue8m0"):
        q, s = act_quant(x, scale_fmt=fmt)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert (q[0].float() == 0).all() and (q[1, :128].float() == 0).all()
        assert torch.isfinite(act_dequant(q, s)).all()
        wq, ws = weight_quant(torch.zeros(130, 260), scale_fmt=fmt)
        assert (wq.float() == 0).all() and torch.isfinite(ws).all()
        assert (weight_dequant(wq, ws) == 0).all()
    assert act_quant(x)[1][0, 0].item() == np.float32(1e-4) / np.float32(448)  # the floor, not 0


def test_saturation_and_range():
    # codes never leave +-448, whatever rounding the scale went through (ue8m0 scales are >= exact)
    x = torch.randn(64, 512) * torch.logspace(-8, 8, 512)
    for fmt in (None, "ue8m0"):
        q, s = act_quant(x, scale_fmt=fmt)
        assert q.float().abs().max() <= 448 and torch.isfinite(q.float()).all()
        assert (q.float().abs().amax(-1) > 0).all()
    # the max element of a group maps onto 448 (non-ue8m0), so the full e4m3 range is used
    q, s = act_quant(torch.randn(4, 128))
    assert (q.float().abs().amax(-1) == 448).all()
    # the cast clamps explicitly: +-inf inside x/s would otherwise be a CPU-only saturation
    from frugallm.kernels.fp8 import _cast
    assert _cast(torch.tensor([1e3, -1e9, float("inf"), 447.0])).float().tolist() == [448.0, -448.0, 448.0, 448.0]


def test_ragged_round_trip_shapes_and_error():
    for shape in [(5, 1), (7, 127), (2, 3, 129), (300,)]:
        x = torch.randn(*shape)
        q, s = act_quant(x)
        assert q.shape == x.shape and s.shape == (*shape[:-1], -(-shape[-1] // 128))
        err = (act_dequant(q, s) - x).norm() / x.norm()
        assert err < 0.04, (shape, err)
    for shape in [(1, 1), (129, 5), (255, 257)]:
        w = torch.randn(*shape) * 0.02
        q, s = weight_quant(w)
        assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
        assert (weight_dequant(q, s) - w).norm() / w.norm() < 0.04
    # docs/design/fp8.md: round trip of Gaussian data ~ 0.026 for both granularities
    x = torch.randn(256, 4096)
    assert abs((act_dequant(*act_quant(x)) - x).norm() / x.norm() - 0.0257) < 0.002
    assert abs((weight_dequant(*weight_quant(x)) - x).norm() / x.norm() - 0.0264) < 0.002


def test_bf16_input_and_dequant_dtype():
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    q, s = act_quant(x)
    assert s.dtype == torch.float32
    assert act_dequant(q, s, dtype=torch.bfloat16).dtype == torch.bfloat16
    torch.testing.assert_close(act_quant(x.float())[0].float(), q.float(), rtol=0, atol=0)


def _tensorwise(t: torch.Tensor) -> torch.Tensor:
    s = t.abs().max().clamp_min(1e-4) / 448
    return (t / s).clamp(-448, 448).to(E4M3).double() * s.double()


@pytest.mark.parametrize("mag", [1e5, 1e6])
def test_outlier_rows_stay_accurate_blockwise_not_tensorwise(mag):
    """docs/design/fp8.md: a 4x4 block of huge activations ruins per-tensor scaling for every row,
    while 1x128 tiles confine the damage to the rows (and tiles) that hold the outliers."""
    g = torch.Generator().manual_seed(0)
    M, K, N = 256, 4096, 256
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = 0.02 * torch.randn(N, K, generator=g, dtype=torch.float64)
    x[:4, :4] *= mag
    ref = x @ w.T
    blockwise = act_dequant(*act_quant(x)).double() @ weight_dequant(*weight_quant(w)).double().T
    tensorwise = _tensorwise(x) @ _tensorwise(w).T
    rows = slice(4, None)  # non-outlier rows

    def rel(y):
        return ((y[rows] - ref[rows]).norm() / ref[rows].norm()).item()

    assert 0.030 < rel(blockwise) < 0.045  # measured 0.0367
    assert rel(tensorwise) > 0.2  # measured 0.206 (1e5), 0.9999 (1e6)


# --- Fp8Linear ----------------------------------------------------------------------------------

def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("shape", [(2, 150, 512, 384), (1, 37, 200, 130)])  # (B, S, K, N); the 2nd ragged
def test_fp8_linear_output_and_all_gradients_close_to_fp64(shape, scale_fmt):
    from frugallm.kernels.fp8 import fp8_linear

    B, S, K, N = shape
    x = torch.randn(B, S, K, dtype=torch.float64)
    w = 0.02 * torch.randn(N, K, dtype=torch.float64)
    b = torch.randn(N, dtype=torch.float64)
    dy = torch.randn(B, S, N, dtype=torch.float64)
    xf, wf, bf = (t.float().requires_grad_() for t in (x, w, b))
    y = fp8_linear(xf, wf, bf, scale_fmt=scale_fmt)
    y.backward(dy.float())
    assert y.shape == (B, S, N) and y.dtype == torch.float32
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N)
    # measured ~0.037 for Fprop and Dgrad; Wgrad ~0.045 (X re-tiled 128x1 from its cached 1x128
    # codes: a second rounding), ~0.037 with ue8m0 where the re-tiling is nearly lossless
    assert _rel(y - bf, x @ w.T) < 0.05
    assert _rel(xf.grad, dy @ w) < 0.05
    assert _rel(wf.grad, dy2.T @ x2) < 0.05
    torch.testing.assert_close(bf.grad.double(), dy2.sum(0), rtol=1e-5, atol=1e-4)  # bias grad not quantised


def test_fp8_linear_is_really_quantised():
    """Not a disguised fp32 linear: the output equals the dequantised-operand product exactly."""
    from frugallm.kernels.fp8 import Fp8Linear

    lin = nn.Linear(256, 128, bias=False)
    x = torch.randn(8, 256)
    y = Fp8Linear.from_linear(lin)(x)
    expected = act_dequant(*act_quant(x)) @ weight_dequant(*weight_quant(lin.weight)).T
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert (y - lin(x)).abs().max() > 1e-4


def test_fp8_linear_saves_fp8_input_only():
    from frugallm.kernels.fp8 import fp8_linear

    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    y = fp8_linear(x, w)
    saved = y.grad_fn.saved_tensors
    assert [t.dtype for t in saved] == [E4M3, torch.float32, torch.float32]
    assert saved[0].shape == x.shape and saved[1].shape == (64, 2) and saved[2] is w  # w: the parameter itself


def test_fp8_linear_under_bf16_autocast():
    from frugallm.kernels.fp8 import Fp8Linear

    lin = nn.Linear(256, 96)
    f8 = Fp8Linear.from_linear(lin)
    x = torch.randn(4, 10, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f8(x)
        ref = lin(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32 and lin.bias.grad is not None
    assert _rel(y.float(), ref.float().double()) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the block-scaled FP8 GEMM needs a CUDA GPU with SM90+")
def test_cuda_fast_path_matches_emulation():
    import warnings

    from frugallm.kernels import fp8

    a, b = torch.randn(256, 512, device="cuda"), 0.02 * torch.randn(384, 512, device="cuda")
    qa, sa = act_quant(a)
    qb, sb = weight_quant(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the emulation must fail this test
        fast = fp8._scaled_mm_blockwise(qa, sa, qb, sb, b_blocks=True)
        fast_tiles = fp8._scaled_mm_blockwise(qa, sa, *act_quant(b), b_blocks=False)
    ref = act_dequant(qa, sa) @ weight_dequant(qb, sb).T
    assert _rel(fast, ref.double()) < 1e-2  # bf16 output
    assert _rel(fast_tiles, (act_dequant(qa, sa) @ act_dequant(*act_quant(b)).T).double()) < 1e-2


# --- the converter, the MoE experts, a tiny model -----------------------------------------------

def test_convert_to_fp8_honours_its_filter(cfg):
    from frugallm.model.moe import MoE, RoutedExperts
    from frugallm.model.transformer import Transformer
    from frugallm.kernels.fp8 import Fp8Experts, Fp8Linear, convert_to_fp8

    model = Transformer(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: id(p) for n, p in model.named_parameters()}
    names = convert_to_fp8(model)
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears["head"] is nn.Linear
    assert linears["layers.0.attn.wq_a"] is Fp8Linear and linears["layers.0.ffn.w1"] is Fp8Linear
    assert linears["layers.1.ffn.shared_experts.w2"] is Fp8Linear and linears["mtp.0.eh_proj"] is Fp8Linear
    assert not any("gate" in n and "experts" not in n for n in names) and "head" not in names
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes and all(type(m.experts) is Fp8Experts for m in moes) and "layers.1.ffn.experts" in names
    # same parameter objects and names, same values: checkpoints stay plain
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a custom filter: skip every attention Linear and the experts
    model = Transformer(cfg)
    names = convert_to_fp8(model, skip=("head", "attn"), experts=False)
    assert names and not any(".attn." in n for n in names) and not any(n.endswith("experts") for n in names)
    assert all(type(m.experts) is RoutedExperts for m in model.modules() if isinstance(m, MoE))


def test_fp8_experts_match_loop_experts():
    from frugallm.model.moe import loop_experts
    from frugallm.kernels.fp8 import fp8_experts, fp8_linear

    N, K, E, d, I = 64, 2, 4, 256, 160
    x = torch.randn(N, d)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    idx[:, 0] = torch.where(torch.arange(N) < 4, 3, idx[:, 0] % 3)  # expert 3 nearly empty, all used
    weights = torch.rand(N, K)
    w1, w3 = 0.05 * torch.randn(E, I, d), 0.05 * torch.randn(E, I, d)
    w2 = 0.05 * torch.randn(E, d, I)
    ws = [w.clone().requires_grad_() for w in (w1, w2, w3)]
    y = fp8_experts(x, weights, idx, *ws)
    # oracle 1: loop_experts with each expert's three GEMMs in FP8 (tiles are per token row, blocks
    # per expert, so sorting the rows changes nothing but the fp32 summation order)
    fp8_loop = torch.zeros_like(x)
    for e in range(E):
        token, slot = torch.where(idx == e)
        h = F.silu(fp8_linear(x[token], w1[e])) * fp8_linear(x[token], w3[e])
        fp8_loop.index_add_(0, token, fp8_linear(h, w2[e]) * weights[token, slot, None])
    torch.testing.assert_close(y, fp8_loop, rtol=1e-5, atol=1e-6)
    # oracle 2: fp64; three chained FP8 GEMMs (silu(w1 x) * w3 x, then w2) compound to ~0.067
    ref = loop_experts(x.double(), weights.double(), idx, w1.double(), w2.double(), w3.double())
    assert _rel(y, ref) < 0.09
    y.square().sum().backward()
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in ws)


def _train_losses(cfg, fp8: bool, state_dtype: str, steps: int = 6) -> list[float]:
    from frugallm.model.transformer import Transformer
    from frugallm.kernels.fp8 import convert_to_fp8
    from frugallm.train.optim import build_optimizer

    torch.manual_seed(0)
    model = Transformer(cfg)
    if fp8:
        convert_to_fp8(model)
    opt = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95), 1e-8, state_dtype)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (4, 33), generator=g)
        ids[:, 1::2] = (ids[:, 0::2][:, :16] * 7) % cfg.vocab_size  # something learnable
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids[:, :-1], targets=ids[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses


def test_tiny_model_trains_with_fp8_close_to_bf16():
    from conftest import tiny_config

    cfg = tiny_config(dim=128, moe_inter_dim=128, inter_dim=256)  # some whole 128-groups
    base = _train_losses(cfg, fp8=False, state_dtype="fp32")
    fp8 = _train_losses(cfg, fp8=True, state_dtype="bf16")
    assert all(math.isfinite(l) for l in fp8)
    assert fp8[-1] < fp8[0]
    for a, b in zip(base, fp8):
        assert abs(a - b) / a < 0.02, (base, fp8)


# --- AdamW with bf16 moments, and the trainer with fp8 on ---------------------------------------

def _adam_run(make_opt, steps=25, state=None):
    torch.manual_seed(3)
    params = [nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(16))]
    opt = make_opt([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}])
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt.step()
    return params, opt


def test_adamw_low_precision_matches_torch_adamw():
    from frugallm.train.adamw import AdamWLowPrecision

    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref, ref_opt = _adam_run(lambda g: torch.optim.AdamW(g, **kw))
    f32, _ = _adam_run(lambda g: AdamWLowPrecision(g, state_dtype=torch.float32, **kw))
    for a, b in zip(f32, ref):  # the same algorithm: equal to fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    bf, bf_opt = _adam_run(lambda g: AdamWLowPrecision(g, **kw))
    start, _ = _adam_run(lambda g: torch.optim.AdamW(g, **kw), steps=0)
    for a, b, p0 in zip(bf, ref, start):  # bf16 moments: the update differs by well under 1 %
        assert (a.float() - b).norm() / (b - p0).norm() < 1e-2
        assert a.dtype == torch.float32
    st = bf_opt.state[bf[0]]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    assert ref_opt.state[ref[0]]["exp_avg"].dtype == torch.float32


def test_trainer_fp8_bf16_moments_resume_and_plain_checkpoint(tmp_path, corpus):
    """`--set fp8=true optim_state_dtype=bf16`: trains, resumes bit for bit (bf16 moments come back
    as bf16), and the checkpoint holds plain fp32 weights that frugallm.load reads."""
    import dataclasses
    import json

    import frugallm
    from frugallm.config import get_preset
    from frugallm.train.config import TrainConfig, apply_overrides
    from frugallm.kernels.fp8 import Fp8Linear
    from frugallm.formats import checkpoint
    from frugallm.train.trainer import train

    sets = ["dim=128", "n_layers=2", "n_heads=2", "q_lora_rank=0", "kv_lora_rank=32", "qk_nope_head_dim=16",
            "qk_rope_head_dim=8", "v_head_dim=16", "n_routed_experts=4", "n_expert_groups=1", "n_limited_groups=1",
            "n_activated_experts=2", "moe_inter_dim=128", "inter_dim=256", "vocab_size=300", "max_seq_len=32",
            "seq_len=32", "batch_size=2", "tokenizer_train_chars=50000", "warmup_steps=2", "eval_every=2",
            "eval_batches=1", "log_every=1", "sample_tokens=0", "save_every=2", "fp8=true", "optim_state_dtype=bf16"]
    model_cfg, train_cfg = apply_overrides(get_preset("tiny"), TrainConfig(data=str(corpus)), sets)
    assert train_cfg.fp8 and train_cfg.optim_state_dtype == "bf16"
    lines = []
    run = lambda out, steps, **kw: train(model_cfg, dataclasses.replace(train_cfg, steps=steps), tmp_path / out,  # noqa: E731
                                         log=lines.append, **kw)
    full = run("full", 4)
    from frugallm.host import choose_dtype

    assert any(f"{choose_dtype('train').name} + fp8" in line for line in lines)  # auto: the host's dtype
    run("cut", 2)
    run("cut", 4, resume=True)

    def losses(run):
        return [(r["loss"], r.get("val_loss")) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert len(losses(full.run_dir)) == 4 and all(math.isfinite(l) for l, _ in losses(full.run_dir))
    assert losses(tmp_path / "cut") == losses(full.run_dir)
    ckpt = checkpoint.latest(full.run_dir)
    from safetensors.torch import load_file

    assert load_file(ckpt / "optimizer.safetensors")["layers.0.attn.wkv_a.weight.exp_avg"].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in load_file(ckpt / "model.safetensors").values())
    model = frugallm.load(full.run_dir)  # a plain model: FP8 is a training-time converter only
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())


def test_emulation_dtype_follows_the_host_and_bf16_stays_close(cfg, monkeypatch):
    """convert_to_fp8's CPU emulation multiplies in the host's training dtype (auto), and the bf16
    emulation is within bf16 rounding of the fp32 one (both on the same FP8 codes)."""
    from frugallm.model.transformer import Transformer
    from frugallm.kernels.fp8 import Fp8Experts, Fp8Linear, convert_to_fp8, fp8_linear

    for host, want in (("no-bf16", torch.float32), ("bf16", torch.bfloat16)):
        monkeypatch.setenv("FRUGALLM_HOST", host)
        model = Transformer(cfg)
        convert_to_fp8(model)
        twins = [m for m in model.modules() if isinstance(m, (Fp8Linear, Fp8Experts))]
        assert twins and all(m.gemm_dtype == want for m in twins)
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(192, 256, requires_grad=True)
    ref = fp8_linear(x, w)
    out = fp8_linear(x, w, gemm_dtype=torch.bfloat16)
    assert out.dtype == torch.float32 and ((out - ref).norm() / ref.norm()).item() < 1e-2
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
