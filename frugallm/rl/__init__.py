"""Reinforcement learning with verifiable rewards: GRPO (DeepSeekMath §4.1, DeepSeek-R1 §2.2) and its
variants (Dr. GRPO, DAPO); docs/design/grpo.md holds the equations and the defaults."""
