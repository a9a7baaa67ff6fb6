#!/usr/bin/env bash
# On-policy KD from a warm start (LOG.md, session 10): CE for 75 steps, then 75 more steps on-policy or
# off-policy KD from that checkpoint, 2 seeds, scored on bench_distill's common val split. Needs the
# teacher and data subset of `python benchmarks/bench_distill.py --work $W --teacher-finetune-steps 400`.
#     W=/tmp/bench_distill_work2 bash benchmarks/exp_onpolicy_warm.sh
set -e
W=${W:-/tmp/bench_distill_work2}
COMMON="--no-sample --set seq_len=128 --set batch_size=8 --set val_fraction=0.1 --set log_every=10"
for s in 0 1; do
  [ -d $W/runs/ce75_s$s/checkpoints ] || frugallm train --preset tiny --set tokenizer=$W/teacher_ft --set vocab_size=16384 --data $W/data --steps 75 $COMMON --set eval_every=75 --set seed=$s --out $W/runs/ce75_s$s > $W/runs/ce75_s$s.log 2>&1
  [ -d $W/runs/opwarm_s$s/checkpoints ] || frugallm distill --teacher $W/teacher_ft --init-from $W/runs/ce75_s$s --data $W/data --loss fkl --temperature 1.0 --kd-weight 0.5 --on-policy 0.5 --steps 75 $COMMON --set eval_every=75 --set seed=$s --out $W/runs/opwarm_s$s > $W/runs/opwarm_s$s.log 2>&1
  [ -d $W/runs/kdwarm_s$s/checkpoints ] || frugallm distill --teacher $W/teacher_ft --init-from $W/runs/ce75_s$s --data $W/data --loss fkl --temperature 1.0 --kd-weight 0.5 --steps 75 $COMMON --set eval_every=75 --set seed=$s --out $W/runs/kdwarm_s$s > $W/runs/kdwarm_s$s.log 2>&1
  echo "seed $s done $(date +%T)"
done
cd "$(dirname "$0")/.." && W="$W" python - <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from pathlib import Path
from bench_distill import common_val_loss
W = Path(__import__("os").environ["W"])
for name in ("ce75", "opwarm", "kdwarm"):
    vals = [common_val_loss(W / "runs" / f"{name}_s{s}", W / "data", W / "teacher_ft", 0.1, 128, 8, 10**9) for s in (0, 1)]
    print(name, [round(v, 4) for v in vals], round(sum(vals) / 2, 4), "+-", round(abs(vals[0] - vals[1]) / 2, 4))
PY
