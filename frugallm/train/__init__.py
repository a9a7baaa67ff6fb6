"""Training: optimizer hooks (and, later, the trainer, data, checkpoints, distillation)."""
