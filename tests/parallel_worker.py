"""The steps tests/test_parallel.py compares: run under torchrun on several ranks, and in the test
process on one (`Local`, the reference). Same seed, same data, float64.

    torchrun --standalone --nproc-per-node N tests/parallel_worker.py OUT --ep E --dp D [--fp8-dispatch]

writes OUT (safetensors, from rank 0): the per-step losses, every full gradient of step 1, and the
final full state (parameters and the gate biases).
"""

from __future__ import annotations

import argparse
import os

import torch

from frugallm.config import get_preset
from frugallm.train.config import TrainConfig
from frugallm.model.transformer import Transformer
from frugallm.parallel.layout import resolve
from frugallm.parallel.runtime import Distributed, Local
from frugallm.train.optim import ExpertBiasUpdate, build_optimizer

STEPS, GRAD_ACCUM, BATCH, SEQ = 3, 8, 2, 16


def model_config():
    # a real fine-grained MoE (8 routed experts, top-2 of 2-of-4 groups, shared expert, MTP), made tiny
    return get_preset("tiny", **dict(vocab_size=96, dim=32, n_layers=4, inter_dim=64, max_seq_len=32, n_heads=2,
                                   q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                   v_head_dim=8, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=16,
                                   n_expert_groups=4, n_limited_groups=2))


def run(world: Local) -> dict[str, torch.Tensor]:
    cfg = model_config()
    torch.manual_seed(0)
    device = getattr(world, "device", "cpu")
    model = world.parallelize(Transformer(cfg).double().to(device))
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8)
    # a large gamma, so the bias moves visibly in 3 steps
    balance = ExpertBiasUpdate(model, 0.05, None, world.all_reduce_load if world.world > 1 else None)
    data = torch.randint(0, cfg.vocab_size, (STEPS * GRAD_ACCUM, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    data = data.to(device)
    targets = data[:, :, 1:].clone()
    targets[1, 0, :] = -100  # micro-batches with different target counts: the loss is the step's global mean
    targets[2, :, 5:] = -100
    out: dict[str, torch.Tensor] = {}
    losses, norms = [], []
    for step in range(STEPS):
        mine = world.micro_batches(step, GRAD_ACCUM)
        total = world.sum([sum(float((targets[i] != -100).sum()) for i in mine)])[0]  # the step's targets
        if world.pipeline is not None:  # the schedule runs the micro-batches, forward and backward
            counts = [float((targets[i] != -100).sum()) for i in mine]
            parts = world.pipeline.step([data[i, :, :-1] for i in mine], [targets[i] for i in mine],
                                        [total / c for c in counts], cfg.mtp_lambda)
            losses.append(world.sum([sum(world.sum_stages(list(parts.values())))])[0])
        else:
            step_loss = 0.0
            for i in mine:
                count = float((targets[i] != -100).sum())
                loss = model(data[i, :, :-1], targets=targets[i]).loss / (total / count)
                loss.backward()
                step_loss += loss.item()
            losses.append(world.sum([step_loss])[0])
        if step == 0:
            for name, p in model.named_parameters():
                if world.pipeline is not None:  # each gradient lives on its stage's ranks, zeros elsewhere
                    grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                    torch.distributed.all_reduce(grad, group=world.pp_group)
                    grad = world.full(name, grad)  # the EP slices of the stage's experts
                else:
                    grad = world.full(name, p.grad)
                out[f"grad.{name}"] = grad.cpu().clone()
        norms.append(float(world.clip_grad_norm(model, 1.0)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        balance.step()
    world.before_save(model, optimizer)
    for name, t in model.state_dict().items():
        out[f"state.{name}"] = world.full(name, t).cpu().clone()
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    out["grad_norms"] = torch.tensor(norms, dtype=torch.float64)
    if world.pipeline is not None:
        from frugallm.parallel import overlap

        out["overlapped_pairs"] = torch.tensor(overlap.pairs_run)
    return out


def main() -> None:
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--dp", type=int, default=0)
    ap.add_argument("--fp8-dispatch", action="store_true")
    ap.add_argument("--backend", default=None, help="gloo (default on CPU) or nccl")
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--schedule", default="dualpipev")
    ap.add_argument("--overlap", action="store_true")
    args = ap.parse_args()
    train_cfg = TrainConfig(ep=args.ep, dp=args.dp, pp=args.pp, pp_schedule=args.schedule, grad_accum=GRAD_ACCUM,
                            fp8_dispatch=args.fp8_dispatch, overlap=args.overlap)
    world = Distributed(resolve(model_config(), train_cfg, int(os.environ["WORLD_SIZE"])), args.fp8_dispatch,
                        backend=args.backend, pipeline=dict(schedule=args.schedule, n_microbatches=GRAD_ACCUM,
                                                            micro_shape=(BATCH, SEQ), overlap=args.overlap))
    torch.set_num_threads(1)
    result = run(world)
    if world.is_main:
        save_file({k: v.contiguous() for k, v in result.items()}, args.out)
    world.close()


if __name__ == "__main__":
    main()
