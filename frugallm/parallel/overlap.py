"""DualPipe's computation-communication overlap, for DualPipeV on torch.distributed (V3 §3.2.1).

DualPipeV pairs, on each rank, the forward of one micro-batch on one local stage with the full
backward of another micro-batch on the other local stage (its OVERLAP_F_B actions). Torch runs the
two one after the other. Here the backward runs on a second thread while the forward runs on this
one: gloo and NCCL collectives release the GIL while they wait, so when one side blocks in an
expert-parallel all-to-all, the other side computes. That is DualPipe's point, where the attention
and MLP of one chunk hide the dispatch and combine of the other; here the scheduler is the OS.

Two rules keep it exact and deadlock-free:
- the two sides never share a process group: forward all-to-alls run on the EP group, backward ones
  on a second group over the same ranks (`ExpertParallelExperts.backward_group`), so each group sees
  its collectives in the same order on every rank whatever the threads' interleaving;
- they never write the same state: the forward touches its own stage (and the next local stage's
  input), the backward its own (and the previous stage's input gradient); the two are different
  stages, and gradient accumulation happens only in the backward thread.
The ops and their inputs are those of the sequential run, so the results are bit for bit the same
(tests/test_parallel.py).

The code mirrors FORWARD and FULL_BACKWARD of torch 2.13's `_PipelineScheduleRuntime._perform_action`
(private API: pinned by the torch version in constraints.txt).
"""

from __future__ import annotations

import threading

from torch.profiler import record_function

from torch.distributed.pipelining.schedules import FORWARD, OVERLAP_F_B, _wait_batch_p2p


def _forward(schedule, action, ctx) -> None:
    stages = {s.stage_index: s for s in schedule._stages}
    index, mb = action.stage_index, action.microbatch_index
    stage = stages[index]
    if not stage.is_first and index - 1 not in stages:  # input from another rank, received already
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((index, mb)))
    output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb])
    schedule._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
    if index + 1 in stages:  # the V's turn: the next stage is on this rank
        stages[index + 1].set_local_fwd_input(output, mb)


def _backward(schedule, action) -> None:
    stages = {s.stage_index: s for s in schedule._stages}
    index, mb = action.stage_index, action.microbatch_index
    stage = stages[index]
    if not stage.is_last and index + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((index, mb)))
    loss = schedule._maybe_get_loss(stage, mb)
    schedule.backward_counter[index] += 1
    last = schedule.backward_counter[index] == schedule._n_microbatches
    stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
    if index - 1 in stages:
        stages[index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)


pairs_run = 0  # overlapped pairs run in this process (tests check that the path was taken)


def overlapped_forward_backward(action, ctx) -> None:
    """OVERLAP_F_B: the backward sub-action on a helper thread, the forward on this one."""
    global pairs_run
    pairs_run += 1
    forward, backward = sorted(action.sub_actions, key=lambda a: a.computation_type != FORWARD)
    schedule, failure = ctx.schedule_ref, []

    def run_backward():
        try:
            with record_function(f"frugallm:B{backward.microbatch_index}"):  # a timeline box (timeline.py)
                _backward(schedule, backward)
        except BaseException as e:  # re-raised on the schedule's thread
            failure.append(e)

    helper = threading.Thread(target=run_backward, name="frugallm-overlap-backward")
    helper.start()
    try:
        with record_function(f"frugallm:F{forward.microbatch_index}"):
            _forward(schedule, forward, ctx)
    finally:
        helper.join()
    if failure:
        raise failure[0]


def enable(schedule) -> None:
    """Run DualPipeV's overlapped pairs concurrently (see the module docstring)."""
    schedule.register_custom_function(OVERLAP_F_B, overlapped_forward_backward)
