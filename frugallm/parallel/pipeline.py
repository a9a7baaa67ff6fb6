"""Pipeline parallelism with torch.distributed.pipelining: DualPipeV (default), 1F1B and ZB-V.

The model is cut into stages of consecutive Blocks. DualPipeV and ZB-V use 2 * pp stages in a V:
rank r runs stage r and stage 2pp-1-r, so rank 0 holds the first stage (the embedding) and the
last one (final norm, output head and the MTP modules), as in V3, where the MTP module shares the
embedding and head with the main model. 1F1B uses pp stages, stage r on rank r.

The stages are views of one full model that every rank builds (same seed, or loaded); a rank only
computes, differentiates and updates the parameters of its own stages. The schedule is torch's
(`ScheduleDualPipeV`, `Schedule1F1B`, `ScheduleZBVZeroBubble`), which also splits each backward
into input (B) and weight (W) parts where the schedule asks for it.

What crosses stages is only the hidden state h (B, S, d), or the hc/mhc streams (B, S, n, d). The
rest of a micro-batch (its token ids for MTP, its labels, its share of the step's mean) every rank
already has: the data loader is a pure function of the step, so `Feed` hands each stage the
micro-batch its k-th call of the step is for (every stage runs its forwards in micro-batch order).
Sequence-balance losses of the MoE layers in earlier stages join the loss through `_WithAux`, whose
backward gives the loss a gradient of 1 with respect to them, as if they had been added at the end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


V_SCHEDULES = ("dualpipev", "zbv")


def stage_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Consecutive blocks per stage, the first stages one longer when they do not divide evenly."""
    base, extra = divmod(n_layers, n_stages)
    out, first = [], 0
    for s in range(n_stages):
        size = base + (s < extra)
        out.append(list(range(first, first + size)))
        first += size
    return out


def stage_owner(stage: int, pp: int, schedule: str) -> int:
    """The pipeline rank that runs `stage`: the V folds stages pp..2pp-1 back onto ranks pp-1..0."""
    return stage if schedule not in V_SCHEDULES or stage < pp else 2 * pp - 1 - stage


class Feed:
    """What every stage needs of the step's micro-batches besides h: set once per step."""

    def __init__(self):
        self.inputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.divisors: list[float] = []  # total / count per micro-batch (0 count: the loss is scaled by 0)
        self.mtp_lambda = 0.0
        self.parts: dict[str, float] = {}

    def set(self, inputs, targets, divisors, mtp_lambda):
        self.inputs, self.targets, self.divisors, self.mtp_lambda = inputs, targets, divisors, mtp_lambda
        self.parts = {"lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}

    def scale(self, loss: torch.Tensor, m: int) -> torch.Tensor:
        d = self.divisors[m]
        return loss / d if d else loss * 0.0

    def add(self, key: str, value: torch.Tensor | None, m: int) -> None:
        if value is not None and self.divisors[m]:
            self.parts[key] += float(value) / self.divisors[m]


class _WithAux(torch.autograd.Function):
    """h unchanged forward; backward passes h's gradient through and gives `aux` a gradient of 1."""

    @staticmethod
    def forward(ctx, h, aux):
        ctx.aux_dtype = aux.dtype
        return h.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=ctx.aux_dtype, device=grad.device)


class Stage(nn.Module):
    """Blocks `layers` of `model`, plus the embedding (first stage) or the head and MTP (last stage).
    forward(h or token ids) -> h, or the micro-batch's share of the step's loss on the last stage."""

    def __init__(self, model: nn.Module, layers: list[int], first: bool, last: bool, feed: Feed):
        super().__init__()
        self._model = [model]  # a reference, not a submodule: the stage owns only what it runs
        self.first, self.last, self.feed = first, last, feed
        self.layers = nn.ModuleList(model.layers[i] for i in layers)
        if first or last:  # the last stage's MTP modules read the embedding and the head too
            self.embed = model.embed
        if last:
            self.norm, self.head, self.mtp, self.hc_head = model.norm, model.head, model.mtp, model.hc_head
        self.calls = 0  # forwards since the step began = the micro-batch this call is for

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        model, feed = self._model[0], self.feed
        m = self.calls
        self.calls += 1
        kwargs = model.block_kwargs(feed.inputs[m])
        if self.first:
            h = model.embed_streams(h)  # the model's own forward, in pieces (model/transformer.py)
        h, balance = model.run_layers(h, enumerate(self.layers), kwargs)
        if not self.last:
            feed.add("balance_loss", balance, m)
            return h if balance is None or not torch.is_grad_enabled() else _WithAux.apply(h, feed.scale(balance, m))
        out = model.finish(h, feed.inputs[m], feed.targets[m], balance, kwargs, feed.mtp_lambda)
        feed.add("lm_loss", out.lm_loss.detach(), m)
        feed.add("mtp_loss", None if out.mtp_loss is None else out.mtp_loss.detach(), m)
        feed.add("balance_loss", None if out.balance_loss is None else out.balance_loss.detach(), m)
        return feed.scale(out.loss, m).reshape(1)  # (1,): the schedule concatenates the micro-batches' outputs


class Pipeline:
    """This rank's stages and the schedule that runs them, for one model and one micro-batch count."""

    def __init__(self, model: nn.Module, pp: int, rank: int, group, schedule: str, n_microbatches: int,
                 micro_shape: tuple[int, int], device: str = "cpu", after_backward=None, overlap: bool = False):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleDualPipeV, ScheduleZBVZeroBubble

        self.model, self.pp, self.rank, self.group, self.schedule_name = model, pp, rank, group, schedule
        self.after_backward = after_backward  # e.g. sum the dense gradients over a stage's EP ranks
        self.n_stages = 2 * pp if schedule in V_SCHEDULES else pp
        self.feed = Feed()
        layers = stage_layers(model.config.n_layers, self.n_stages)
        self.stage_ids = [s for s in range(self.n_stages) if stage_owner(s, pp, schedule) == rank]
        self.stages = {s: Stage(model, layers[s], s == 0, s == self.n_stages - 1, self.feed) for s in self.stage_ids}
        # each parameter's pipeline rank (the V puts the embedding, which MTP reads too, on one rank)
        self.owner = {}
        for s in range(self.n_stages):
            modules = [model.layers[i] for i in layers[s]] + ([model.embed] if s == 0 else [])
            modules += [model.norm, model.head, model.mtp] if s == self.n_stages - 1 else []
            self.owner |= {id(p): stage_owner(s, pp, schedule) for m in modules for p in m.parameters()}
        # example inputs and outputs, so torch does not infer shapes by running a stage (ours read the Feed)
        dtype = self._hidden_dtype()
        # (requires_grad: torch makes the receive buffers of a stage's inputs like its example)
        hidden = torch.zeros(self._hidden_shape(torch.zeros(micro_shape)), dtype=dtype, device=device,
                             requires_grad=True)
        ids = torch.zeros(micro_shape, dtype=torch.long, device=device)
        loss = torch.zeros(1, dtype=torch.promote_types(torch.float32, dtype), device=device)
        pipes = [PipelineStage(self.stages[s], s, self.n_stages, torch.device(device), group=group,
                               input_args=(ids if s == 0 else hidden,),
                               output_args=(loss if s == self.n_stages - 1 else hidden,))
                 for s in self.stage_ids]
        kind = {"dualpipev": ScheduleDualPipeV, "zbv": ScheduleZBVZeroBubble, "1f1b": Schedule1F1B}[schedule]
        loss_fn = _identity_loss
        self.schedule = kind(pipes, n_microbatches, loss_fn=loss_fn, scale_grads=False) if schedule in V_SCHEDULES \
            else kind(pipes[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
        if overlap:  # DualPipeV's forward-and-backward pairs run concurrently (overlap.py)
            from .overlap import enable

            enable(self.schedule)

    @property
    def has_first(self) -> bool:
        return 0 in self.stages

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stages

    def step(self, inputs: list[torch.Tensor], targets: list[torch.Tensor], divisors: list[float],
             mtp_lambda: float) -> dict[str, float]:
        """Forward and backward of every micro-batch; returns this rank's parts of the logged loss."""
        self.feed.set(inputs, targets, divisors, mtp_lambda)
        for st in self.stages.values():
            st.calls = 0
        batch = torch.cat(inputs)  # the schedule cuts it back into the micro-batches along dim 0
        args = (batch,) if self.has_first else ()
        kwargs = {"target": torch.zeros(batch.shape[0])} if self.has_last else {}
        self.schedule.step(*args, **kwargs)
        if self.after_backward is not None:
            self.after_backward()
        return dict(self.feed.parts)

    @torch.no_grad()
    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The main-head loss of one batch, stage by stage over point-to-point sends (evaluation:
        no schedule, no backward). Every pipeline rank calls it; every rank gets the value."""
        self.feed.set([x], [y], [1.0], 0.0)
        h = x
        for s in range(self.n_stages):
            owner = stage_owner(s, self.pp, self.schedule_name)
            previous = stage_owner(s - 1, self.pp, self.schedule_name) if s else owner
            if owner == self.rank:
                if previous != owner:
                    h = torch.empty(self._hidden_shape(x), dtype=self._hidden_dtype())
                    dist.recv(h, group_src=previous, group=self.group)
                self.stages[s].calls = 0
                h = self.stages[s](h)
            elif previous == self.rank:
                dist.send(h.contiguous(), group_dst=owner, group=self.group)
        lm = torch.tensor([self.feed.parts["lm_loss"] if self.has_last else 0.0], dtype=torch.float64)
        dist.broadcast(lm, group_src=stage_owner(self.n_stages - 1, self.pp, self.schedule_name), group=self.group)
        return float(lm.item())

    def _hidden_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        cfg = self.model.config
        B, S = x.shape
        return (B, S, cfg.hc_streams, cfg.dim) if cfg.residual != "plain" else (B, S, cfg.dim)

    def _hidden_dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    @torch.no_grad()
    def sync_full(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Copy every stage's parameters and AdamW moments from its owner to every pipeline rank, so
        any rank holds the whole, current model (before a checkpoint is written from rank 0)."""
        for p in model.parameters():
            src = self.owner[id(p)]
            dist.broadcast(p.data, group_src=src, group=self.group)
            state = optimizer.state.get(p)
            has = torch.tensor([1 if state else 0])
            dist.broadcast(has, group_src=src, group=self.group)
            if not has.item():
                continue
            if not state:
                state = optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                              "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                dist.broadcast(state[key], group_src=src, group=self.group)


def _identity_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output.sum()  # the last stage already returns its micro-batch's share of the step's loss, (1,)
