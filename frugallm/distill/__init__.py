"""Token-level knowledge distillation: a student trained toward a frozen teacher's next-token distributions.

    losses.py    kd_divergence (fkl | rkl | jsd(β) | tvd, per token) and distill_loss ((1 − w)·CE + w·τ²·D)
    teacher.py   match_vocab (same token -> id map, padding rows sliced off) and Teacher (frozen, fp32 logits)
    offline.py   the teacher's top-k log-probs over the training windows, computed once, memory-mapped
    objective.py what the trainer calls when TrainConfig.teacher is set: online / offline / on-policy
    sequences.py sequence-level KD: the teacher samples prompts into SFT records (`frugallm distill generate`)

Sequence-level KD (the teacher writes text, the student is fine-tuned on it; train/data.py puts the loss
on completions only) works across tokenizers, and is what a teacher with another vocabulary must use.
"""

from .losses import KINDS, TopK, distill_loss, kd_divergence
from .offline import TopKCache, build_topk_cache, topk_record
from .teacher import Teacher, match_vocab

__all__ = ["KINDS", "TopK", "kd_divergence", "distill_loss", "Teacher", "match_vocab", "TopKCache",
           "build_topk_cache", "topk_record"]
