import pytest
import torch

from frugallm import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough for exact fp64 checks in milliseconds."""
    base = dict(vocab_size=97, dim=64, n_layers=3, n_dense_layers=1, inter_dim=96, max_seq_len=64,
                n_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                moe_inter_dim=16, n_expert_groups=4, n_limited_groups=2, n_mtp=1)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def cfg() -> ModelConfig:
    return tiny_config()
