"""The pipeline schedule simulator: op lists, timing, memory, and DeepSeek-V3 Table 2."""

import json

import pytest

from frugallm.cli import main
from frugallm.parallel.schedule import (SCHEDULES, Durations, Op, makes, n_stages, needs, run, schedule_dualpipev,
                                        simulate, table2)

GRID = [Durations(1, 1, 1), Durations(1, 2, 0.5), Durations(2, 1, 1), Durations(1, 1, 0), Durations(1, 1, 1, 2.5)]


@pytest.mark.parametrize("pp,chunks", [(2, 1), (2, 4), (3, 2), (4, 4), (4, 9), (8, 16)])
@pytest.mark.parametrize("d", GRID[:4])
def test_1f1b_bubble_is_table2_for_any_chunks(pp, chunks, d):
    res = run("1f1b", pp, chunks, d)
    expected = (pp - 1) * (d.f + d.b + d.w)  # Table 2's (PP-1)(F+B), its B being our full backward B+W
    assert res.bubble == pytest.approx([expected] * pp)
    assert table2("1f1b", pp, d)["bubble"] == pytest.approx(expected)
    assert res.busy == pytest.approx([chunks * (d.f + d.b + d.w)] * pp)
    assert res.peak_activations == [min(pp - r, chunks) for r in range(pp)]  # PP on rank 0 once chunks >= PP


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("pp,chunks", [(2, 4), (3, 7), (4, 8), (4, 13)])
def test_every_op_once_and_dependencies_respected(schedule, pp, chunks):
    d = Durations(1, 1.5, 0.5, 2.5)
    res, stages = run(schedule, pp, chunks, d), n_stages(schedule, pp)
    made, ends = [], {}
    for rank_ops, rank_times in zip(res.ops, res.times):
        for op, (t0, t1) in zip(rank_ops, rank_times):
            made += makes(op)
            ends.update((k, t1) for k in makes(op))
    backward_split = {k[1:] for k in made if k[0] == "w"}
    assert sorted(k for k in made if k[0] != "w") == sorted(
        (kind, s, m) for kind in "fg" for s in range(stages) for m in range(chunks))
    assert len(backward_split) == sum(k[0] == "w" for k in made)  # each W once, only after a split B
    for rank_ops, rank_times in zip(res.ops, res.times):
        for i, (op, (t0, t1)) in enumerate(zip(rank_ops, rank_times)):
            assert t1 - t0 == pytest.approx(d.of(op))
            assert i == 0 or t0 >= rank_times[i - 1][1] - 1e-12  # one op at a time per rank
            assert all(ends[k] <= t0 + 1e-12 for k in needs(op, stages)), op
            assert op.kind != "B" or (op.stage, op.mb) in backward_split


@pytest.mark.parametrize("pp,chunks", [(2, 4), (4, 8), (4, 16), (8, 20)])
def test_v_schedules_layout_busy_and_memory(pp, chunks):
    d = Durations(1, 1, 1)
    for schedule, peak in (("dualpipev", 2 * pp + 1), ("zbv", 2 * pp)):
        res = run(schedule, pp, chunks, d)
        assert res.stages_per_rank == [(r, 2 * pp - 1 - r) for r in range(pp)]  # rank 0: first and last stage
        assert res.busy == pytest.approx([2 * chunks * (d.f + d.b + d.w)] * pp)  # 2 stages per rank
        assert res.peak_activations[0] == peak
    assert table2("dualpipev", pp, d)["activations"] == 2 * pp + 1  # README: PP+1 with PP = 2*pp stages


def test_dualpipev_follows_the_repo_phases():
    pp, chunks = 4, 10
    ops = schedule_dualpipev(pp, chunks)
    assert ops[0][:2 * (pp - 1)] == [Op("F", 0, m) for m in range(2 * (pp - 1))]  # phase 1: nF0
    for r, rank_ops in enumerate(ops):  # phases 4 and 5 overlap F&B; the last rank's first pair stays apart
        n_fb = 2 * (chunks - 2 * pp + r + 1) + (pp - r - 1) - (r == pp - 1)
        assert sum(op.kind == "FB" for op in rank_ops) == n_fb
        assert rank_ops[-1].kind == "W"


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_dualpipev_bubble_below_1f1b(pp):
    d = Durations(1, 1, 1)
    assert max(run("dualpipev", pp, 2 * pp, d).bubble) < max(run("1f1b", pp, 2 * pp, d).bubble)
    # the same model on the same ranks: a V stage is half a 1F1B stage
    half = Durations(0.5, 0.5, 0.5)
    assert max(run("dualpipev", pp, 2 * pp, half).bubble) < max(run("1f1b", pp, 2 * pp, d).bubble) / 2


@pytest.mark.parametrize("pp,chunks", [(2, 4), (3, 7), (4, 8), (6, 20)])
def test_dualpipev_against_table2(pp, chunks):
    for f in (0.5, 1, 2):
        for b in (0.5, 1, 2):
            for w in (0, 0.5, 1, 1.5):
                for gain in (0, 0.5):
                    d = Durations(f, b, w, f + b + w - gain)
                    if d.f_and_b < max(f, b + w):
                        continue
                    sim, t2 = max(run("dualpipev", pp, chunks, d).bubble), table2("dualpipev", pp, d)["bubble"]
                    extra = (pp - 1) * (max(0, f - b) + max(0, w - b))  # what Table 2 leaves out
                    if b > f:  # the repo's un-overlapped first pair on the last rank only helps
                        assert sim <= t2 + extra + 1e-9
                    else:
                        assert sim == pytest.approx(t2 + extra), d


def test_zbv_reaches_the_floor_when_f_b_w_are_equal():
    for pp in (2, 4, 8):
        for d in (Durations(1, 1, 1), Durations(2, 2, 2)):
            assert run("zbv", pp, 3 * pp, d).bubble == pytest.approx([(pp - 1) * d.f] * pp)


@pytest.mark.parametrize("args,message", [
    (("1f1b", 1, 4, Durations()), "--pp 1: a pipeline needs at least 2 ranks; use --pp 2 or more"),
    (("dualpipev", 4, 7, Durations()), "--chunks 7 is too few for dualpipev at --pp 4 (DualPipeV needs chunks "
                                       ">= 2*pp); use --chunks 8 or more"),
    (("zbv", 4, 0, Durations()), "--chunks 0 is too few for zbv at --pp 4; use --chunks 1 or more"),
    (("zbv", 2, 4, Durations(f=0)), "--f 0: a duration must be > 0"),
    (("zbv", 2, 4, Durations(b=-1)), "--b -1: a duration must be > 0"),
    (("zbv", 2, 4, Durations(w=-1)), "--w -1: the weight-grad time must be >= 0"),
    (("dualpipev", 2, 4, Durations(1, 1, 1, 1.5)), "--fb 1.5: an overlapped F&B takes at least its longer half and "
                                                   "at most both in a row; use a value in [2, 3]"),
    (("gpipe", 2, 4, Durations()), "unknown --schedule 'gpipe'; choose one of: 1f1b, zbv, dualpipev"),
])
def test_invalid_inputs(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("*", r"\*").replace("+", r"\+")):
        run(*args)


def test_a_wrong_order_deadlocks_clearly():
    ops = [[Op("BW", 0, 0), Op("F", 0, 0)], [Op("F", 1, 0), Op("BW", 1, 0)]]
    with pytest.raises(RuntimeError, match="deadlocks: rank 0 at BW0@s0"):
        simulate(ops, 2, Durations())


def test_cli_prints_table_json_and_trace(capsys, tmp_path):
    assert main(["parallel", "simulate", "--pp", "4", "--chunks", "8"]) == 0
    out = capsys.readouterr().out
    assert "(PP-1)(F+B), PP=4" in out and "(PP/2-1)(F&B+B-3W), PP=8" in out
    rows = {row[0]: row for row in map(str.split, out.splitlines()) if row[0] in SCHEDULES and row[1].isdigit()}
    assert rows["1f1b"][1:7] == ["4", "33", "24", "9", "9", "(PP-1)(F+B),"]
    assert rows["dualpipev"][1:7] == ["8", "54", "48", "6", "6", "(PP/2-1)(F&B+B-3W),"]
    trace = tmp_path / "t.json"
    assert main(["parallel", "simulate", "--pp", "2", "--chunks", "4", "--schedule", "dualpipev", "--json",
                 "--trace", str(trace)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["bubble"] == [2.0, 2.0] and result["peak_activations"] == [5, 5] and result["model_copies"] == 1
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["pid"] for e in events} == {0, 1}
    assert sum(e["ph"] == "X" for e in events) == sum(len(r) for r in schedule_dualpipev(2, 4))
    assert main(["parallel", "simulate", "--pp", "4", "--chunks", "4"]) == 2
    assert "--chunks 4 is too few for dualpipev at --pp 4" in capsys.readouterr().err
