"""host.py: the measured host profile, its cache and override, and the `auto` dtype choices built on it.

The behaviour that matters on a host without native bf16 is tested on every machine by forcing the
profile (FRUGALLM_HOST=no-bf16); what only a real such CPU shows (oneDNN refusing bf16 packing)
is covered by the same code path, since prepacking asks the profile first.
"""

import dataclasses
import warnings

import pytest
import torch

from frugallm import Transformer, host, inference_dtype, load_for_inference
from frugallm.cli import main
from frugallm.kernels.prepack import PackedLinear, prepack, unavailable_reason

from conftest import tiny_config


def _profile(gemm, gemv, **kw):
    base = host.forced("no-bf16")
    return dataclasses.replace(base, gemm_gflops={"fp32": 100.0, "bf16": 100.0 * gemm},
                               gemv_gflops={"fp32": 10.0, "bf16": 10.0 * gemv}, source="test", **kw)


@pytest.mark.parametrize("gemm, gemv, want", [
    (4.5, 1.9, {"train": "bf16", "prefill": "bf16", "decode": "bf16", "inference": "bf16"}),  # Zen 5
    (0.01, 0.8, {"train": "fp32", "prefill": "fp32", "decode": "fp32", "inference": "fp32"}),  # Zen 3, eager
    (0.01, 1.6, {"train": "fp32", "prefill": "fp32", "decode": "bf16", "inference": "fp32"}),  # GEMVs win, GEMMs lose
    (1.2, 1.2, {"train": "fp32", "prefill": "fp32", "decode": "fp32", "inference": "fp32"}),  # not clearly faster
])
def test_auto_takes_bf16_only_where_clearly_faster(gemm, gemv, want):
    p = _profile(gemm, gemv)
    got = {purpose: host.choose_dtype(purpose, profile=p).name for purpose in host.PURPOSES}
    assert got == want
    line = host.choose_dtype("train", profile=p).reason
    assert line.startswith(f"train dtype auto -> {want['train']}") and "GFLOP/s" in line and "[test]" in line


def test_explicit_choice_is_honoured_and_slow_bf16_warns_with_the_ratio():
    slow = _profile(0.01, 0.8)
    with pytest.warns(UserWarning, match=r"bf16 0\.01x fp32 at GEMMs"):
        assert host.choose_dtype("train", "bf16", profile=slow).dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 asked on a bf16 host, bf16 asked where it is fast: no warning
        assert host.choose_dtype("decode", torch.float32, profile=_profile(4.5, 1.9)).dtype == torch.float32
        assert host.choose_dtype("train", "bfloat16", profile=_profile(4.5, 1.9)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int4' must be auto or one of"):
        host.choose_dtype("train", "int4", profile=slow)
    with pytest.raises(ValueError, match="purpose='sing'"):
        host.choose_dtype("sing", profile=slow)


def test_env_forces_the_profile(monkeypatch):
    monkeypatch.setenv("FRUGALLM_HOST", "no-bf16")
    p = host.host_profile()
    assert p.source == "forced:no-bf16" and not p.bf16_prepack and not p.bf16_native
    assert host.choose_dtype("inference").dtype == torch.float32
    monkeypatch.setenv("FRUGALLM_HOST", "bf16")
    assert host.choose_dtype("train").dtype == torch.bfloat16
    monkeypatch.setenv("FRUGALLM_HOST", "avx9000")
    with pytest.raises(ValueError, match="FRUGALLM_HOST='avx9000' must be one of"):
        host.host_profile()


def test_measured_profile_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("FRUGALLM_CACHE", str(tmp_path))
    monkeypatch.delenv("FRUGALLM_HOST", raising=False)
    calls = []

    def fake_measure(prepack):
        calls.append(prepack)
        return {"fp32": 50.0, "bf16": 5.0}, {"fp32": 8.0, "bf16": 6.0}

    monkeypatch.setattr(host, "_measure", fake_measure)
    first = host.host_profile()
    host._profile.cache_clear()  # a new process: reads the file, measures nothing
    second = host.host_profile()
    assert (first.source, second.source) == ("measured", "cached") and len(calls) == 1
    assert second.gemm_gflops == first.gemm_gflops and second.cpu_model == first.cpu_model
    files = list((tmp_path / "host").glob("*.json"))
    assert len(files) == 1 and "torch_version" in files[0].read_text()
    files[0].write_text("{not json")  # a damaged cache is measured again, not an error
    host._profile.cache_clear()
    assert host.host_profile().source == "measured" and len(calls) == 2
    host._profile.cache_clear()


def test_real_measurement_runs_and_is_sane():
    p = host.measure()
    assert p.capability == torch.backends.cpu.get_cpu_capability() and p.torch_version == torch.__version__
    assert all(v > 0 for v in (*p.gemm_gflops.values(), *p.gemv_gflops.values()))
    assert "auto: train" in p.describe()


def test_no_bf16_host_gets_fp32_and_no_prepacking(monkeypatch, tiny_run):
    monkeypatch.setenv("FRUGALLM_HOST", "no-bf16")
    model = Transformer(tiny_config()).to(torch.bfloat16)
    assert prepack(model) == [] and "does not prepack bf16" in unavailable_reason(model)
    m = load_for_inference(tiny_run)
    assert m.embed.weight.dtype == torch.float32
    assert not any(isinstance(x, PackedLinear) for x in m.modules())
    assert inference_dtype().reason.startswith("inference dtype auto -> fp32")
    with pytest.warns(UserWarning, match="slower than fp32"):  # explicit bf16 still works, with a warning
        m = load_for_inference(tiny_run, "bf16")
    assert m.embed.weight.dtype == torch.bfloat16 and not any(isinstance(x, PackedLinear) for x in m.modules())


def test_bf16_host_gets_bf16_and_prepacking_where_onednn_packs(monkeypatch, tiny_run):
    monkeypatch.setenv("FRUGALLM_HOST", "bf16")
    m = load_for_inference(tiny_run)
    assert m.embed.weight.dtype == torch.bfloat16
    packed = any(isinstance(x, PackedLinear) for x in m.modules())
    assert packed == host.host_profile().bf16_prepack  # a forced profile never packs where oneDNN cannot


def test_info_host_prints_the_profile(monkeypatch, capsys):
    monkeypatch.setenv("FRUGALLM_HOST", "no-bf16")
    assert main(["info", "--host"]) == 0
    out = capsys.readouterr().out
    assert "native bf16: no" in out and "forced:no-bf16" in out and "auto: train fp32" in out
