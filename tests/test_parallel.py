"""Expert and data parallelism on gloo, against one process (parallel/, tests/parallel_worker.py).

Each case launches real torchrun processes (2 or 4, on however many cores there are) that train
3 steps in float64, and compares them with the same steps in this process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frugallm.config import get_preset
from frugallm.train.config import TrainConfig
from frugallm.cli import main
from frugallm.parallel.layout import LayoutError, grad_accum_for, resolve, torchrun_command
from frugallm.train import launch
from frugallm.parallel.runtime import Local

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("parallel_worker.py")
spec = importlib.util.spec_from_file_location("parallel_worker", WORKER)
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def reference():
    return worker.run(Local())


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(), b.flatten()
    if a.norm() == 0 and b.norm() == 0:
        return 0.0
    return float(1 - (a @ b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("nproc,flags", [(2, ["--ep", "2"]), (2, ["--dp", "2"]), (4, ["--ep", "4"]),
                                         (4, ["--ep", "2", "--dp", "2"]), (2, ["--pp", "2", "--dp", "1"]),
                                         (2, ["--pp", "2", "--dp", "1", "--schedule", "zbv"]),
                                         ],
                         ids=["ep2", "dp2", "ep4", "ep2xdp2", "pp2-dualpipev", "pp2-zbv"])
def test_matches_one_process(tmp_path, reference, nproc, flags):
    out = tmp_path / "result.safetensors"
    torchrun(nproc, str(WORKER), str(out), *flags)
    got = load_file(out)
    got.pop("overlapped_pairs", None)
    assert set(got) == set(reference)
    # the loss: equal up to the order of the sums over ranks (float64)
    assert torch.allclose(got["losses"], reference["losses"], rtol=0, atol=1e-6), (got["losses"], reference["losses"])
    assert torch.allclose(got["grad_norms"], reference["grad_norms"], rtol=1e-9)
    grads = [k for k in reference if k.startswith("grad.")]
    assert any(".experts." in k for k in grads) and any(".gate." in k for k in grads)
    for key in grads:
        assert cosine_distance(got[key], reference[key]) < 1e-10, key
        assert torch.allclose(got[key], reference[key], rtol=1e-7, atol=1e-12), key
    biases = [k for k in reference if k.endswith("gate.bias")]
    assert biases and any(reference[k].abs().sum() > 0 for k in biases)  # the bias moved
    for key in reference:
        if key.startswith("state."):
            if key.endswith("gate.bias"):  # integer loads, the same sign rule: exactly equal
                assert torch.equal(got[key], reference[key]), key
            else:
                assert torch.allclose(got[key], reference[key], rtol=0, atol=1e-9), key


def test_dualpipev_with_ep_overlapped_equals_sequential_and_one_process(tmp_path, reference):
    """PP 2 x EP 2 (4 ranks): DualPipeV's forward-and-backward pairs run concurrently (overlap.py), bit
    for bit the sequential schedule, and both match one process."""
    runs = {}
    for name, extra in (("sequential", []), ("overlap", ["--overlap"])):
        torchrun(4, str(WORKER), str(tmp_path / name), "--pp", "2", "--ep", "2", "--dp", "1", *extra)
        runs[name] = load_file(tmp_path / name)
    assert runs["sequential"].pop("overlapped_pairs") == 0 and runs["overlap"].pop("overlapped_pairs") > 0
    for key in runs["sequential"]:
        assert torch.equal(runs["overlap"][key], runs["sequential"][key]), key
    got = runs["overlap"]
    assert torch.allclose(got["losses"], reference["losses"], rtol=0, atol=1e-6)
    for key in reference:
        if key.startswith("grad."):
            assert cosine_distance(got[key], reference[key]) < 1e-10, key
        elif key.startswith("state.") and key.endswith("gate.bias"):
            assert torch.equal(got[key], reference[key]), key
        elif key.startswith("state."):
            assert torch.allclose(got[key], reference[key], rtol=0, atol=1e-9), key


def test_fp8_dispatch_is_close_not_exact(tmp_path, reference):
    out = tmp_path / "result.safetensors"
    torchrun(2, str(WORKER), str(out), "--ep", "2", "--fp8-dispatch")
    got = load_file(out)
    diff = (got["losses"] - reference["losses"]).abs().max()
    assert 0 < diff < 2e-2 * reference["losses"].abs().max()  # e4m3 in 1x128 tiles: ~3 significant bits


def test_fp8_wire_round_trip():
    from frugallm.parallel.expert import fp8_decode, fp8_encode

    x = torch.randn(5, 129, dtype=torch.float64) * torch.logspace(-3, 3, 5, dtype=torch.float64)[:, None]
    wire = fp8_encode(x)
    assert wire.dtype == torch.uint8 and wire.shape == (5, 129 + 4 * 2)  # codes, then 2 tiles' fp32 scales
    back = fp8_decode(wire, 129, torch.float64)
    assert torch.equal(fp8_decode(fp8_encode(x[1:2]), 129, torch.float64), back[1:2])  # one row: a 4-byte aligned view
    assert back.dtype == torch.float64
    assert ((back - x).abs() <= x.abs() * 2 ** -3 + 1e-12 * x.abs().amax(1, keepdim=True)).all()  # e4m3: 3 mantissa bits


def test_micro_batches_partition_the_step():
    class Two(Local):
        data_ranks = 2

    a, b = Two(), Two()
    b.data_rank = 1
    assert a.micro_batches(3, 4) == [12, 14] and b.micro_batches(3, 4) == [13, 15]
    assert Local().micro_batches(3, 4) == [12, 13, 14, 15]


def bad(world: int, **train) -> str:
    with pytest.raises(LayoutError) as e:
        resolve(get_preset("tiny"), TrainConfig(**train), world)
    return str(e.value)


def test_layout_errors_name_the_fields():
    assert "ep * pp * dp = 2 * 1 * 1 = 2 must equal the world size 4" in bad(4, ep=2, dp=1, grad_accum=2)
    assert "n_routed_experts=16 must divide by ep=3" in bad(3, ep=3, grad_accum=3)
    assert "grad_accum=1" in bad(2, ep=2, grad_accum=1) and "--set grad_accum=2" in bad(2, ep=2, grad_accum=1)
    assert "needs >= 4 micro-batches per data rank" in bad(2, pp=2, grad_accum=2)
    assert "pp=2 with dp=2 is not built yet" in bad(4, pp=2, dp=2, grad_accum=8)
    assert "pp_schedule=1f1b puts the MTP module" in bad(2, pp=2, pp_schedule="1f1b", grad_accum=4)
    assert "pp_schedule='gpipe'" in bad(2, pp=2, pp_schedule="gpipe", grad_accum=4)
    assert "distillation" in bad(2, dp=2, grad_accum=2, teacher="runs/x")
    assert "fp8 training runs in one process" in bad(2, dp=2, grad_accum=2, fp8=True)
    assert "ep=2 needs routed experts" in str(pytest.raises(LayoutError, resolve, get_preset(
        "tiny", n_routed_experts=0), TrainConfig(ep=2, grad_accum=2), 2).value)
    assert "does not divide by ep * pp" in bad(3, ep=2, grad_accum=2)
    layout = resolve(get_preset("tiny"), TrainConfig(ep=2, grad_accum=4), 4)
    assert (layout.ep, layout.dp, layout.data_ranks) == (2, 2, 4)


@pytest.mark.parametrize("world, layout, fewest", [
    (1, {}, 1), (2, dict(ep=2), 2), (2, dict(dp=2), 2), (4, dict(ep=2, dp=2), 4), (4, dict(ep=4), 4),
    (2, dict(pp=2), 4), (2, dict(pp=2, pp_schedule="zbv"), 2), (4, dict(pp=2, ep=2), 8)])
def test_the_default_grad_accum_is_the_fewest_the_layout_takes(world, layout, fewest):
    """Issue 31: `frugallm train --nproc 2 --ep 2` failed on the default grad_accum=1. The default (None)
    is the fewest micro-batches the layout takes; an explicit value is still checked (above)."""
    cfg = TrainConfig(**layout)
    assert cfg.grad_accum is None
    resolved = resolve(get_preset("tiny"), cfg, world)
    assert grad_accum_for(resolved, cfg) == fewest
    resolve(get_preset("tiny"), TrainConfig(**layout, grad_accum=fewest), world)  # and it is valid
    if fewest > 1:  # one fewer is not
        with pytest.raises(LayoutError):
            resolve(get_preset("tiny"), TrainConfig(**layout, grad_accum=fewest - 1), world)
    assert grad_accum_for(resolved, TrainConfig(**layout, grad_accum=3 * fewest)) == 3 * fewest


def test_nproc_with_defaults_launches_with_its_threads_set(monkeypatch, capsys, tmp_path):
    """`frugallm train --nproc 2 --ep 2` with every default: the layout check passes, and torchrun gets
    OMP_NUM_THREADS from frugallm (torchrun prints a banner where it sets it itself)."""
    class Launched(BaseException):  # what the patched execv raises in place of becoming torchrun
        pass

    launched = []

    def execv(path, cmd):
        launched.append((cmd, os.environ.get("OMP_NUM_THREADS")))
        raise Launched

    monkeypatch.setenv("OMP_NUM_THREADS", "restored at teardown")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.setattr(launch, "threads_per_process", lambda threads, nproc: threads or 3)
    monkeypatch.setattr(sys, "argv", ["frugallm", "train", "--nproc", "2", "--ep", "2", "--out", str(tmp_path / "r")])
    with pytest.raises(Launched):
        main(sys.argv[1:])
    (cmd, threads), = launched
    assert "--nproc-per-node=2" in cmd and cmd[-5:] == ["train", "--ep", "2", "--out", str(tmp_path / "r")]
    assert threads == "3" and "invalid parallel layout" not in capsys.readouterr().err
    assert launch.threads_per_process(0, 2) >= 1 and launch.threads_per_process(5, 2) == 5


def test_cli_refuses_a_bad_layout_before_spawning(tmp_path):
    # nothing is launched: the error comes back at once, naming the fields
    result = subprocess.run([sys.executable, "-m", "frugallm", "train", "--nproc", "2", "--ep", "3", "--dp", "1",
                             "--steps", "1",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert "ep * pp * dp = 3 * 1 * 1 = 3 must equal the world size 2" in result.stderr
    assert "n_routed_experts=16 must divide by ep=3" in result.stderr
    assert not (tmp_path / "run").exists()


def test_torchrun_command():
    cmd = torchrun_command(2, ["train", "--ep", "2"])
    assert "--nproc-per-node=2" in cmd and "--standalone" in cmd and cmd[-4:] == ["frugallm", "train", "--ep", "2"]
    cmd = torchrun_command(2, ["train"], nnodes=2, node_rank=1, rdzv_endpoint="localhost:29400")
    assert "--node-rank=1" in cmd and "--rdzv-endpoint=localhost:29400" in cmd and "--standalone" not in cmd
    with pytest.raises(LayoutError, match="--rdzv-endpoint"):
        torchrun_command(2, ["train"], nnodes=2)


SMALL = ["dim=64", "n_layers=2", "n_heads=2", "q_lora_rank=0", "kv_lora_rank=32", "qk_nope_head_dim=16",
         "qk_rope_head_dim=8", "v_head_dim=16", "n_routed_experts=8", "n_expert_groups=2", "n_limited_groups=1",
         "n_activated_experts=2", "moe_inter_dim=32", "inter_dim=128", "vocab_size=384", "max_seq_len=64",
         "seq_len=32", "batch_size=2", "grad_accum=4", "tokenizer_train_chars=200000", "warmup_steps=2",
         "eval_every=3", "eval_batches=3", "log_every=1", "sample_tokens=0", "precision=fp32", "bias_gamma=0.01"]


def train_cli(out, corpus, steps, *flags, resume=False):
    cmd = [sys.executable, "-m", "frugallm", "train", "--data", str(corpus), "--out", str(out), "--steps", str(steps),
           "--save-every", "3", "--no-sample", *[f"--set={s}" for s in SMALL], *flags, *(["--resume"] if resume else [])]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return {r["step"]: r for r in map(__import__("json").loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_nproc_2_ep_2_trains_with_the_default_grad_accum(tmp_path, corpus):
    """Issue 31, for real: two processes, every layout default; no torchrun banner about OMP_NUM_THREADS."""
    sets = [f"--set={s}" for s in SMALL if not s.startswith("grad_accum=")]
    cmd = [sys.executable, "-m", "frugallm", "train", "--nproc", "2", "--ep", "2", "--steps", "2", "--no-sample",
           "--data", str(corpus), "--out", str(tmp_path / "run"), *sets]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "grad_accum 2: the fewest micro-batches per step that ep 2 x pp 1 x dp 1 = 2 ranks take" in result.stdout
    assert "OMP_NUM_THREADS" not in result.stdout + result.stderr
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["grad_accum"] == 2  # a resume keeps it


def close(a: dict, b: dict, steps) -> None:
    for s in steps:
        for key in ("loss", "lm_loss", "balance_loss", "val_loss", "grad_norm"):
            if key in a[s] or key in b[s]:
                assert abs(a[s][key] - b[s][key]) <= 1e-5 * max(1.0, abs(a[s][key])), (s, key, a[s][key], b[s][key])


def test_train_on_ranks_matches_one_process_and_resumes_on_any_world_size(tmp_path, corpus):
    """`frugallm train --nproc 2 --ep 2` (torchrun, gloo, fp32) against one process; a run saved on 2
    ranks resumes on 1, on 2 (bit for bit) and on 4 (ep 2 x dp 2)."""
    import shutil

    from frugallm import load

    one = train_cli(tmp_path / "one", corpus, 6)
    two = train_cli(tmp_path / "two", corpus, 6, "--nproc", "2", "--ep", "2")
    close(one, two, range(1, 7))
    assert "val_loss" in two[3] and "val_loss" in two[6]
    a, b = load(tmp_path / "one").state_dict(), load(tmp_path / "two").state_dict()  # full tensors on disk
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k

    train_cli(tmp_path / "cut", corpus, 3, "--nproc", "2", "--ep", "2")
    for world, flags in (("on1", []), ("on2", ["--nproc", "2", "--ep", "2"]),
                         ("on4", ["--nproc", "4", "--ep", "2", "--dp", "2"])):
        shutil.copytree(tmp_path / "cut", tmp_path / world)
        resumed = train_cli(tmp_path / world, corpus, 6, *flags, resume=True)
        assert sorted(resumed) == list(range(1, 7))
        if world == "on2":
            assert all(resumed[s]["loss"] == two[s]["loss"] for s in range(1, 7))  # same world: bit for bit
        close(resumed, two, range(4, 7))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_match_one_node(tmp_path, corpus):
    """Two `--nnodes 2` launches (one process each, c10d rendezvous on localhost) train as one world
    of 2 ranks, bit for bit the run of `--nproc 2` on one node."""
    one_node = train_cli(tmp_path / "one_node", corpus, 3, "--nproc", "2", "--ep", "2")
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "two_nodes"
    cmds = [[sys.executable, "-m", "frugallm", "train", "--data", str(corpus), "--out", str(out), "--steps", "3",
             "--save-every", "3", "--no-sample", *[f"--set={s}" for s in SMALL], "--ep", "2", "--nproc", "1",
             "--nnodes", "2", "--node-rank", str(node), "--rdzv-endpoint", endpoint] for node in (0, 1)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
             for c in cmds]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    two = {r["step"]: r for r in map(__import__("json").loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert [two[s]["loss"] for s in (1, 2, 3)] == [one_node[s]["loss"] for s in (1, 2, 3)]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_nccl_matches_one_process(tmp_path, reference):
    out = tmp_path / "result.safetensors"
    torchrun(2, str(WORKER), str(out), "--ep", "2", "--backend", "nccl")
    got = load_file(out)
    assert torch.allclose(got["losses"], reference["losses"], rtol=0, atol=1e-6)


def test_train_with_dualpipev_matches_one_process_and_resumes_on_one(tmp_path, corpus):
    """`frugallm train --nproc 2 --pp 2` (DualPipeV: 4 stages in a V, embedding, head and MTP on rank 0)
    against one process; its checkpoint continues on one process."""
    import shutil

    four = ["--set", "n_layers=4"]
    one = train_cli(tmp_path / "one", corpus, 6, *four)
    pp = train_cli(tmp_path / "pp", corpus, 6, *four, "--nproc", "2", "--pp", "2", "--set", "trace_step=2")
    close(one, pp, range(1, 7))
    assert "val_loss" in pp[3] and "val_loss" in pp[6]
    # the traced step's timeline: both ranks, DualPipeV's overlapped pairs among the actions
    trace = tmp_path / "pp" / "trace"
    assert (trace / "rank0.json").exists() and (trace / "rank1.json").exists() and (trace / "timeline.png").exists()
    summary = __import__("json").loads((trace / "timeline.json").read_text())
    assert len(summary["ranks"]) == 2 and all(0 <= r["bubble"] < 1 for r in summary["ranks"])
    assert all({"F", "FB"} <= set(r["mean_ms"]) for r in summary["ranks"])
    # pipeline x expert parallel, with DualPipeV's pairs overlapped: 4 ranks, the same steps
    eight = [*four, "--set", "grad_accum=8"]  # DualPipeV: >= 4 micro-batches for each of the 2 pipelines
    one8 = train_cli(tmp_path / "one8", corpus, 3, *eight)
    ppep = train_cli(tmp_path / "ppep", corpus, 3, *eight, "--nproc", "4", "--pp", "2", "--ep", "2", "--dp", "1",
                     "--set", "overlap=true")
    close(one8, ppep, range(1, 4))
    assert ppep[1]["ep_bytes_per_step"] > 0
    shutil.copytree(tmp_path / "pp", tmp_path / "on1")
    shutil.rmtree(tmp_path / "on1" / "checkpoints" / "step_0000006")
    (tmp_path / "on1" / "metrics.jsonl").write_text("")  # rebuilt from step 3 on by the resume
    resumed = train_cli(tmp_path / "on1", corpus, 6, *four, resume=True)
    close(resumed, one, range(4, 7))


def test_timeline_busy_bubble_and_exposed_communication(tmp_path):
    from frugallm.parallel import timeline

    def trace(path, events):
        path.write_text(__import__("json").dumps({"traceEvents": [
            {"ph": "X", "name": n, "ts": t, "dur": d} for n, t, d in events]}))
        return path

    # rank 0: F 0-10, overlapped pair 10-30, an all-to-all 25-40, W 40-50: busy throughout, 15 us in the a2a
    # rank 0: F 0-10, overlapped pair 10-30, an all-to-all 25-40, W 40-50: busy throughout, 15 us in the
    # a2a, 10 of them with nothing else running
    r0 = trace(tmp_path / "rank0.json", [("PP:0F0", 0, 10), ("PP:(0F1;3B0)OVERLAP_F_B", 10, 20),
                                          ("frugallm:a2a", 25, 15), ("PP:0W0", 40, 10), ("PP:0SEND_F0", 10, 1)])
    # rank 1, overlap.py's pair: the forward (thread 1, 20-30) waits in an a2a 22-28 while the backward
    # (thread 2, 21-50) computes: the a2a is hidden; the envelope 20-50 is dropped for its inner boxes
    r1 = trace(tmp_path / "rank1.json", [("PP:(2F0;1B0)OVERLAP_F_B", 20, 30), ("other", 0, 100)])
    events = __import__("json").loads(r1.read_text())["traceEvents"]
    events += [{"ph": "X", "name": "frugallm:F0", "ts": 20, "dur": 10, "tid": 1},
               {"ph": "X", "name": "frugallm:a2a", "ts": 22, "dur": 6, "tid": 1},
               {"ph": "X", "name": "frugallm:B0", "ts": 21, "dur": 29, "tid": 2}]
    r1.write_text(__import__("json").dumps({"traceEvents": events}))
    ranks = [timeline.intervals(r0), timeline.intervals(r1)]
    assert [c[0] for c in ranks[0]["compute"]] == ["F", "FB", "W"]
    assert sorted(c[0] for c in ranks[1]["compute"]) == ["B", "F"]
    s = timeline.summarize(ranks)
    assert s["span_ms"] == 50 / 1e3
    assert s["ranks"][0]["busy_ms"] == 50 / 1e3 and s["ranks"][0]["comm_ms"] == 15 / 1e3
    assert s["ranks"][0]["compute_ms"] == 35 / 1e3 and s["ranks"][0]["exposed_comm_ms"] == 15 / 1e3
    assert s["ranks"][0]["bubble"] == 0
    assert s["ranks"][1]["bubble"] == 0.4 and s["ranks"][1]["comm_ms"] == 6 / 1e3
    assert s["ranks"][1]["exposed_comm_ms"] == 0
    timeline.plot(ranks, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
