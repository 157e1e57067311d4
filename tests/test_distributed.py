"""Guidance under Accelerate with several processes (CPU, gloo), and under fp16 GradScaler.

Each multi-process test launches tests/distributed/train_worker.py (torchrun or
``accelerate launch``) and a 1-process run over the same global batches, then
compares what the ranks wrote. Guidance settings reach the workers through
``SGG_*`` variables, as in a real launched run.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import GradientWatch, backward, batch, tiny_mlp

from sgg_optim import GuidedOptimizer
from sgg_optim.accelerate import GuidancePlugin, find_guided

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "distributed" / "train_worker.py"
STEPS = 8
GUIDANCE_ENV = {"SGG_MAX_ANGLE": "20", "SGG_WARMUP_STEPS": "2", "SGG_SPIKE_FACTOR": "1.5"}
TIMEOUT = 300

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGG_", "ACCELERATE_"))}
    env.update(GUIDANCE_ENV, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
               HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return env


def run_all(*commands: list[str]) -> None:
    """Run commands concurrently; fail with their output if any fails."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    failures = []
    try:
        for cmd, proc in zip(commands, procs):
            out, _ = proc.communicate(timeout=TIMEOUT)
            if proc.returncode != 0:
                failures.append(f"$ {' '.join(map(str, cmd))}\n(exit {proc.returncode})\n{out[-12000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not failures, "\n\n".join(failures)


def one_process(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(WORKER), "--out", str(out), "--expect-world", "1", *args]


def torchrun(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(WORKER), "--out", str(out), "--expect-world", "2", *args]


def results(out: Path, world: int) -> list[dict]:
    found = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert [r["world"] for r in found] == [world] * world
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_ranks_identical(ranks: list[dict]) -> None:
    for name, value in ranks[0]["params"].items():
        for other in ranks[1:]:
            assert torch.equal(value, other["params"][name]), f"{name} differs across ranks"


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        assert err <= atol, f"{name}: max |diff| {err:.3g} > {atol:.1g}"


def assert_rewrote_gradients(rank: dict, min_steps: int) -> None:
    """The rank's gradients were changed by guidance (its GradientWatch: before vs after
    guidance) on exactly the steps whose stats report a rule acting, at least ``min_steps``."""
    assert rank["changed"] == rank["acted"], list(zip(rank["changed"], rank["acted"]))
    assert sum(rank["changed"]) >= min_steps, rank["changed"]


def assert_guided_on_synced_steps(rank: dict) -> None:
    """Guidance ran once per optimizer step, only on sync steps, on all-reduced grads;
    the SGG_* settings reached the run, and guidance did change gradients."""
    assert rank["config"]["max_angle"] == 20.0 and rank["config"]["warmup_steps"] == 2
    assert [s["step"] for s in rank["stats"]] == list(range(1, STEPS + 1))
    assert len(rank["seen"]) == STEPS
    assert all(s["sync"] and s["grads_equal"] for s in rank["seen"]), rank["seen"]
    assert max(s["projected"] for s in rank["stats"]) > 0
    assert_rewrote_gradients(rank, min_steps=STEPS - 2 - 2)  # after the 2-step warm-up, most steps


def unguided_params(grad_accum: int = 1) -> dict[str, torch.Tensor]:
    """The 1-process run without guidance: plain AdamW over the same global batches
    (conftest's tiny_mlp and batch are the worker's model and global micro-batches)."""
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(grad_accum):
            x, y = batch(step * grad_accum + micro)
            (torch.nn.functional.cross_entropy(model(x), y) / grad_accum).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_far_from_unguided(params: dict, unguided: dict, atol: float) -> None:
    """Guidance moved the parameters well beyond the comparison tolerance."""
    diff = max((params[n] - unguided[n]).abs().max().item() for n in params)
    assert diff > 100 * atol, f"guided run within {diff:.3g} of the unguided one"


# (name, worker args, tolerance against the 1-process run)
CASES = {
    "fp32": ([], 1e-6),
    "accum2": (["--grad-accum", "2", "--wrap", "before"], 1e-6),
    # a frozen source reference captured through the DDP model (its backward averages
    # the ranks' gradients, so every rank holds the 1-process reference)
    "source": (["--reference", "source"], 1e-6),
    # the same reference captured through accelerator.unwrap_model(model): each rank's
    # backward sees its own batches only, and capture_reference averages over the ranks
    "source-unwrapped": (["--reference", "source-unwrapped"], 1e-6),
    # bf16 autocast rounds each rank's half-batch products to bf16, so 1 and 2
    # processes agree to bf16 precision only; ranks still agree bit for bit.
    "bf16": (["--mixed-precision", "bf16"], 5e-3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_two_processes_match_one(case, tmp_path):
    """Guards: apply_guidance_ not writing the gradients (EMA update kept)."""
    args, atol = CASES[case]
    run_all(one_process(tmp_path / "one", *args), torchrun(tmp_path / "two", *args))
    (one,), two = results(tmp_path / "one", 1), results(tmp_path / "two", 2)
    assert_ranks_identical(two)
    assert_close(two[0]["params"], one["params"], atol)
    for rank in (one, *two):
        assert_guided_on_synced_steps(rank)
    for a, b in zip(one["stats"], two[0]["stats"]):
        assert a["projected"] == b["projected"]
    mode = "sources" if case.startswith("source") else "ema"
    assert one["reference_mode"] == two[0]["reference_mode"] == mode
    if case != "bf16":  # (bf16 autocast moves the unguided run too)
        assert_far_from_unguided(one["params"], unguided_params(2 if case == "accum2" else 1), atol)
    if case.startswith("source"):  # guided from the first step, no warm-up
        assert not math.isnan(two[0]["stats"][0]["cos"])


def test_fsdp2_matches_ddp_with_one_small_all_reduce_per_step(tmp_path):
    """Guards: apply_guidance_ not writing the gradients (EMA update kept)."""
    fsdp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(WORKER.parent / "fsdp_worker.py"), "--out", str(tmp_path / "fsdp")]
    run_all(fsdp, torchrun(tmp_path / "ddp"), torchrun(tmp_path / "ddp_source", "--reference", "source"))
    ddp, sharded = results(tmp_path / "ddp", 2), results(tmp_path / "fsdp", 2)
    ddp_source = results(tmp_path / "ddp_source", 2)
    assert_ranks_identical(sharded)
    assert_close(sharded[0]["params"], ddp[0]["params"], 1e-6)
    assert_far_from_unguided(sharded[0]["params"], unguided_params(), 1e-6)
    total = sum(v.numel() for v in ddp[0]["params"].values())
    for rank in sharded:
        assert rank["local_numel"] < total  # the gradients really were sharded
        assert_rewrote_gradients(rank, min_steps=STEPS - 2 - 2)  # each rank's shards were guided
        assert all(s["dtensor_grads"] for s in rank["stats"])
        # one all_reduce per step, of the [blocks, 1 + 2k] float64 statistics (1 block;
        # k = 0 during the EMA warm-up, then 1)
        assert [len(c) for c in rank["all_reduce_bytes"]] == [1] * STEPS
        assert [c[0] for c in rank["all_reduce_bytes"]] == [8] * 2 + [24] * (STEPS - 2)
        assert max(c[0] for c in rank["all_reduce_bytes"]) <= 64
        # resumed after step 3 from per-rank state_dict() shards: bit-identical
        for name, value in rank["params"].items():
            assert torch.equal(value, rank["resumed"][name]), name
        # a source reference captured on the sharded model is sharded, and after a save
        # (gathered) and load (re-sharded) it guides as the same reference does under DDP
        assert rank["captured_is_sharded"] and rank["source_mode"] == "sources"
        assert_close(rank["source_params"], ddp_source[0]["params"], 1e-6)
    for a, b in zip(ddp[0]["stats"], sharded[0]["stats"]):
        assert a["projected"] == b["projected"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


def test_two_nodes_match_one_process(tmp_path):
    port = str(free_port())
    nodes = [[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
              "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
              "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(WORKER), "--out", str(tmp_path / "nodes"), "--expect-world", "2"] for rank in (0, 1)]
    run_all(one_process(tmp_path / "one"), *nodes)
    (one,), two = results(tmp_path / "one", 1), results(tmp_path / "nodes", 2)
    assert_ranks_identical(two)
    assert_close(two[0]["params"], one["params"], 1e-6)
    assert_guided_on_synced_steps(two[1])


def test_save_state_resume_is_bit_identical(tmp_path):
    """The resumed steps must really be guided, or an unguided resume would match too.

    Guards: apply_guidance_ not writing the gradients (EMA update kept).
    """
    state = tmp_path / "state"
    run_all(torchrun(tmp_path / "full", "--save-at", "3", "--state-dir", str(state)))
    saved = torch.load(state / "optimizer.bin", weights_only=True)
    assert saved["guidance"]["accepted"] == 3 and saved["guidance"]["refs"]
    run_all(torchrun(tmp_path / "resumed", "--load-state", str(state)))
    full, resumed = results(tmp_path / "full", 2), results(tmp_path / "resumed", 2)
    assert len(resumed[0]["stats"]) == STEPS - 3  # it really started from step 3
    for rank in resumed:
        assert_rewrote_gradients(rank, min_steps=2)
    assert_ranks_identical(resumed)
    for f, r in zip(full, resumed):
        for name, value in f["params"].items():
            assert torch.equal(value, r["params"][name]), name
        assert f["guidance"]["accepted"] == r["guidance"]["accepted"] == STEPS
        assert torch.equal(f["guidance"]["norm_ema"], r["guidance"]["norm_ema"])
        for i, entry in f["guidance"]["refs"].items():
            assert torch.equal(entry["ema"]["values"], r["guidance"]["refs"][i]["ema"]["values"])


# -- fp16 GradScaler: driven directly, since CPU autocast has no fp16 path ---------------
def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_same_state(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    base_a, base_b = a[1]["state"], b[1]["state"]
    assert base_a.keys() == base_b.keys()
    for i in base_a:
        for key in base_a[i]:
            assert torch.equal(torch.as_tensor(base_a[i][key]), torch.as_tensor(base_b[i][key])), (i, key)
    ga, gb = a[1]["guidance"], b[1]["guidance"]
    assert (ga["accepted"], ga["skipped"]) == (gb["accepted"], gb["skipped"])
    assert torch.equal(ga["norm_ema"], gb["norm_ema"]) and torch.equal(ga["norm_count"], gb["norm_count"])
    for i in ga["refs"]:
        assert torch.equal(ga["refs"][i]["ema"]["values"], gb["refs"][i]["ema"]["values"])


def _scaled_step(model, opt, scaler, step, inject_inf=False):
    """One fp16-style step; ``opt`` is a GuidedOptimizer or an AcceleratedOptimizer over one
    (which calls ``scaler.step`` and ``scaler.update`` itself)."""
    guided = find_guided(opt)
    opt.zero_grad()
    x, y = batch(step)
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    if inject_inf:
        next(model.parameters()).grad[0, 0] = float("inf")
    scaler.unscale_(guided)  # as accelerator.clip_grad_norm_ does
    seen = [p.grad.clone() for p in model.parameters()]
    if opt is guided:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return seen


@pytest.mark.parametrize("through_accelerate", [False, True])
def test_grad_scaler_skips_inf_step_and_guidance_sees_unscaled_grads(through_accelerate, request):
    """Guards: apply_guidance_ not writing the gradients (EMA update kept)."""
    model = tiny_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    if through_accelerate:
        opt = request.getfixturevalue("accelerated_with_scaler")(model, scaler)
        guided = find_guided(opt)
        assert guided is not None and opt.optimizer is guided
    else:
        opt = guided = GuidedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), warmup_steps=2, max_angle=20)
    guidance_grads = []
    guided.register_step_pre_hook(lambda o, a, k: guidance_grads.append([p.grad.clone() for p in model.parameters()]))
    watch = GradientWatch(guided)
    for step in range(4):
        _scaled_step(model, opt, scaler, step)
    assert guided.stats["step"] == 4 and guided.stats["skipped"] == 0
    # Guidance saw the unscaled gradient: equal to an unscaled backward at the same point.
    before = _snapshot(model, guided)
    twin = copy.deepcopy(model)
    backward(twin, 4)
    seen = _scaled_step(model, opt, scaler, 4)
    for g, p in zip(seen, twin.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(x, y) for x, y in zip(guidance_grads[-1], seen))
    assert not all(torch.equal(x, y) for x, y in zip(before[0], model.parameters()))  # that step did update
    watch.assert_rewrote_where_reported(min_steps=1)  # and guidance rewrote the unscaled gradients

    before, scale = _snapshot(model, guided), scaler.get_scale()
    calls = len(guidance_grads)
    _scaled_step(model, opt, scaler, 5, inject_inf=True)
    assert len(guidance_grads) == calls, "guidance ran on a skipped step"
    assert scaler.get_scale() == scale / 2
    _assert_same_state(before, _snapshot(model, guided))
    assert guided.stats["step"] == 5
    if through_accelerate:
        assert opt.step_was_skipped
        _scaled_step(model, opt, scaler, 6)
        assert not opt.step_was_skipped and guided.stats["step"] == 6


@pytest.fixture
def accelerated_with_scaler():
    """Build an AcceleratedOptimizer with a scaler, then wrap its inner optimizer (after
    prepare, as GuidancePlugin.wrap does); the Accelerate state is reset afterwards."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    Accelerator(cpu=True)

    def build(model, scaler):
        holder = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), scaler=scaler)
        return GuidancePlugin(warmup_steps=2, max_angle=20).wrap(holder)

    yield build
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("reference", ["source", "ema"])
def test_accelerate_fsdp2_parameter_swap_and_distributed_checkpoint(reference, tmp_path):
    """Accelerate's FSDP2 prepare swaps the optimizer's parameters for sharded DTensors and
    save_state checkpoints through torch's distributed checkpoint. Guards: guidance state
    keyed by the original Parameter objects (the captured reference stops applying), and
    a guidance state that the distributed checkpoint drops (the resume loses the EMA and
    statistics)."""
    worker = WORKER.parent / "accelerate_fsdp2_worker.py"
    run_all([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(worker), "--out", str(tmp_path), "--reference", reference])
    ranks = results(tmp_path, 2)
    for rank in ranks:
        assert rank["sharded"] and rank["reference_mode"] == ("sources" if reference == "source" else "ema")
        assert_close(rank["params"], rank["single"], 1e-6)  # guided as on one process, unsharded
        assert rank["stats"]["projected"] == rank["single_stats"]["projected"] > 0
        assert rank["clipped"] and rank["clipped"] == rank["single_clipped"]  # the spike was clipped
        for name, value in rank["params"].items():  # resumed from the distributed checkpoint
            assert torch.equal(value, rank["resumed"][name]), name
    assert_far_from_unguided(ranks[0]["params"], unguided_params(), 1e-6)


def test_fsdp1_is_refused_before_any_rank_guides_alone(tmp_path):
    """FSDP1's flat shards are plain tensors: each rank would guide with its own statistics."""
    run_all([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(WORKER.parent / "fsdp1_worker.py"), "--out", str(tmp_path)])
    for rank in results(tmp_path, 2):
        for key in ("after_wrap_False", "after_wrap_True", "at_step"):
            assert "does not support FSDP1" in rank[key], (key, rank[key])
        assert rank["unchanged"]

