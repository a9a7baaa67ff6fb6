"""The distillation part of a training run's config (train/config.py composes it into TrainConfig).

It lives here so distill/ never imports train/: distill/objective.py reads these fields (and the
run's seed and seq_len) from the TrainConfig it is given.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistillConfig:
    # --- distillation (frugallm/distill/; `frugallm distill`): "" teacher = plain training
    teacher: str = ""  # a frugallm run or Hugging Face DeepSeek dir with the student's vocabulary (padding allowed)
    kd_loss: str = "fkl"  # fkl (forward KL) | rkl (reverse KL) | jsd (generalised JSD(kd_beta), TRL's) | tvd
    kd_beta: float = 0.5  # jsd only: 0 = forward KL, 1 = reverse KL
    kd_temperature: float = 1.0  # tau: both distributions softened by it
    kd_weight: float = 0.5  # w in (1 - w) CE + w tau^2 D
    kd_tau_squared: bool = True  # the tau^2 factor (Hinton): D's gradient scale independent of tau
    kd_topk: int = 0  # 0: the teacher runs every step (online); k: its top-k log-probs cached once (offline)
    on_policy: float = 0.0  # fraction of micro-batches whose continuations the student samples (GKD's lmbda)
    init_from: str = ""  # the student's initial weights: a frugallm run or Hugging Face dir ("" = random init)

    def problems(self) -> list[str]:
        """This part's invalid values, one message each (types are checked before, by check_types)."""
        errors = []
        if self.kd_loss not in ("fkl", "rkl", "jsd", "tvd"):
            errors.append(f"kd_loss={self.kd_loss!r} must be 'fkl', 'rkl', 'jsd' or 'tvd'")
        if not 0 <= self.kd_beta <= 1 or not 0 <= self.kd_weight <= 1 or not 0 <= self.on_policy <= 1:
            errors.append("kd_beta, kd_weight and on_policy must be in [0, 1]")
        if not 0 < self.kd_temperature < float("inf") or self.kd_topk < 0:  # a NaN fails `<= 0` too
            errors.append(f"kd_temperature={self.kd_temperature} must be > 0 and kd_topk={self.kd_topk} >= 0")
        if not self.teacher and (self.kd_topk or self.on_policy):
            errors.append("kd_topk and on_policy need a teacher (--teacher DIR / --set teacher=DIR)")
        return errors
