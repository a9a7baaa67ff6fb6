import json

import pytest

from frugallm import PRESETS, ModelConfig, count_params, get_preset


def test_json_round_trip(tmp_path):
    cfg = get_preset("v3")
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown ModelConfig key\(s\) \['n_expert'\].*n_routed_experts"):
        ModelConfig.from_dict({"n_expert": 3})
    with pytest.raises(ValueError, match="valid keys"):
        get_preset("tiny", hidden_size=3)


def test_an_older_config_with_execution_keys_still_opens(tmp_path):
    """config.json files from before the execution plan held attn_impl / moe_impl: read and ignored,
    since how a model runs is the plan's (plan.py), not the architecture's."""
    d = ModelConfig().to_dict()
    assert "attn_impl" not in d and "moe_impl" not in d
    (tmp_path / "config.json").write_text(json.dumps({**d, "attn_impl": "auto", "moe_impl": "grouped"}))
    assert ModelConfig.from_json(tmp_path / "config.json") == ModelConfig()
    with pytest.raises(ValueError, match="unknown ModelConfig key"):
        ModelConfig.from_dict({**d, "moe_implementation": "grouped"})


@pytest.mark.parametrize("changes, fields", [
    (dict(n_routed_experts=10, n_expert_groups=4), "n_routed_experts=10 must be divisible by n_expert_groups=4"),
    (dict(n_limited_groups=5, n_expert_groups=4), "n_limited_groups=5"),
    (dict(n_activated_experts=9), "n_activated_experts=9"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
    (dict(score_func="relu"), "score_func='relu' must be one of"),
    (dict(n_dense_layers=9), "n_dense_layers=9 exceeds n_layers"),
])
def test_inconsistent_values_name_the_fields(changes, fields):
    with pytest.raises(ValueError, match=fields.replace("(", r"\(").replace(")", r"\)")):
        get_preset("tiny", **changes)


def test_preset_lookup_is_exact():
    with pytest.raises(ValueError, match="unknown preset 'V3'; choose one of: tiny, small, v2-lite, v2, v3, v32, tiny-v32, tiny-v4, v4-flash, v4-pro"):
        get_preset("V3")
    assert set(PRESETS) == {"tiny", "small", "v2-lite", "v2", "v3", "v32", "tiny-v32", "tiny-v4", "v4-flash", "v4-pro"}


def test_parameter_counts():
    v3 = count_params(get_preset("v3"))
    assert v3["total"] == 671_026_419_200  # gate biases included, MTP excluded
    assert v3["active"] == 37_552_297_472  # embedding + head counted (docs/design/configs.md)
    assert abs(v3["active"] - 37.5e9) / 37.5e9 < 0.01
    assert v3["mtp"] == 11_610_068_224
    lite = count_params(get_preset("v2-lite"))
    assert lite["total"] == 15_706_484_224
    assert lite["active"] == 2_661_150_208
    v2 = count_params(get_preset("v2"))  # V2's "236B total, 21B activated" (V2 §1)
    assert v2["total"] == 235_741_434_880 and v2["active"] == 21_375_800_320
    small = count_params(get_preset("small"))["total"]
    assert 30e6 <= small <= 60e6


def test_v3_without_gate_bias_loses_exactly_the_biases():
    with_bias = count_params(get_preset("v3"))["total"]
    without = count_params(get_preset("v3", gate_bias=False))["total"]
    assert with_bias - without == 58 * 256
