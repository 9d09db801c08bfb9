"""DeepSpeed ZeRO 1-3: the norms a guard measures, reports and clips by are
the whole model's, on every rank, though each rank holds only its partition
of the gradients (in the ZeRO optimizer, not in `param.grad`).

Two processes (gloo on the CPU, DeepSpeed's CPU accelerator) train the model
of test_sharded.py under each stage in turn, with a real `gradguard serve`,
and compare with one process training an unsharded copy clipped by
`torch.nn.utils.clip_grad_norm_`. A bf16 run checks that a step the guard
skips changes nothing even where DeepSpeed would take it (bf16 with its
overflow check off).

Skipped where deepspeed is not installed (`.ci/run` installs the version the
client was tested with). DeepSpeed compiles a small C++ op for its CPU
collectives on first use (ninja, which it installs, and a C++ compiler; ~20 s,
cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import Server, free_port
from test_sharded import BATCH, LR, MAX_NORM, STEPS, Net, batch, matches_reference, reference, stored_as_reference

import gradguard

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install deepspeed==0.19.8, as .ci/run does)",
)

WORLD = 2
STAGES = (1, 2, 3)


def _worker(rank: int, port: int, addr: str, out: str) -> None:
    os.environ.update(
        DS_ACCELERATOR="cpu",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        # ninja, for the CPU collectives op DeepSpeed builds, is in this venv's bin.
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    try:
        for stage in STAGES:
            torch.save(_train(deepspeed, stage, rank, addr), f"{out}.{stage}.{rank}")
        torch.save(_skip_bf16(deepspeed, rank, addr), f"{out}.bf16.{rank}")
        torch.save(_refused(deepspeed, addr), f"{out}.refused.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _engine(deepspeed, stage: int, dtype: torch.dtype = torch.float32, **extra):
    net = Net().to(dtype)
    config = extra | {
        "train_micro_batch_size_per_gpu": BATCH // WORLD,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # torch's SGD
        # bf16 without DeepSpeed's own overflow check: a NaN step would be taken (see _skip_bf16).
        "bf16": {"enabled": dtype is torch.bfloat16, "check_grad_overflow": False},
    }
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    engine, optimizer, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=config)
    return engine, optimizer


def _local_batch(step: int, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    return x.chunk(WORLD)[rank].to(dtype), y.chunk(WORLD)[rank].to(dtype)


def _poison(guard) -> None:
    """One NaN in the first gradient fragment rank 0 holds."""
    tensors, _ = guard.layers.sharding.local_pieces(guard.layers.params)
    with torch.no_grad():
        tensors[0].view(-1)[0] = math.nan


def _full_params(deepspeed, engine) -> dict[str, torch.Tensor]:
    """The unsharded fp32 parameters (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n.removeprefix("module."): safe_get_full_fp32_param(p).clone() for n, p in engine.named_parameters()}


def _train(deepspeed, stage: int, rank: int, addr: str) -> dict:
    from deepspeed.utils import safe_get_full_grad

    engine, optimizer = _engine(deepspeed, stage)
    guard = gradguard.watch(
        engine, optimizer, job=f"zero-{stage}", server=addr, max_norm=MAX_NORM, max_abs=True, linger=0
    )
    measured = []
    send = guard._send

    def record(step, m):
        measured.append((m.grad_norm, dict(zip(guard.layers.names, m.layer_l2)), m.layer_max_abs, m.layer_nonfinite))
        send(step, m)

    guard._send = record
    before = _full_params(deepspeed, engine)
    # A step with one NaN in one rank's partition: every rank skips it.
    x, y = _local_batch(0, rank)
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    if rank == 0:
        _poison(guard)
    poisoned = guard.step(loss)
    engine.step()  # called whatever guard.step said: it changes nothing after a skip
    unchanged = all(torch.equal(p, before[n]) for n, p in _full_params(deepspeed, engine).items())
    grads = None
    for step in range(STEPS):
        x, y = _local_batch(step, rank)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        ok = guard.step(loss)
        if step == STEPS - 1:
            grads = {n.removeprefix("module."): safe_get_full_grad(p).clone() for n, p in engine.named_parameters()}
        assert ok
        engine.step()
    guard.close()
    return {
        "names": guard.layers.names,
        "stage": getattr(guard.layers.sharding, "stage", None),
        "measured": measured,
        "poisoned": poisoned,
        "unchanged": unchanged,
        "skipped": guard.stats.skipped,
        "clipped": guard.stats.clipped,
        "grads": grads,
        "params": _full_params(deepspeed, engine),
    }


def _skip_bf16(deepspeed, rank: int, addr: str) -> dict:
    """ZeRO-2 in bf16 with `check_grad_overflow` off: DeepSpeed itself would
    take a step with NaN gradients; the guard's skip keeps it out."""
    engine, optimizer = _engine(deepspeed, 2, torch.bfloat16)
    guard = gradguard.watch(engine, optimizer, job="zero-bf16", server=addr, linger=0)
    before = _full_params(deepspeed, engine)
    x, y = _local_batch(0, rank, torch.bfloat16)
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    if rank == 0:
        _poison(guard)
    poisoned = guard.step(loss)
    engine.step()
    after = _full_params(deepspeed, engine)
    # The next step is taken (finite), so a skip is not stuck.
    x, y = _local_batch(1, rank, torch.bfloat16)
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    taken = guard.step(loss)
    norm = guard.last_grad_norm
    engine.step()
    moved = any(not torch.equal(p, after[n]) for n, p in _full_params(deepspeed, engine).items())
    guard.close()
    return {
        "poisoned": poisoned,
        "unchanged": all(torch.equal(after[n], p) for n, p in before.items()),
        "taken": taken,
        "norm": norm,
        "moved": moved,
        "finite": all(bool(torch.isfinite(p).all()) for p in _full_params(deepspeed, engine).values()),
    }


def _refused(deepspeed, addr: str) -> str:
    """bf16 ZeRO-1 with fp32 gradient accumulation takes DeepSpeed's
    BF16_Optimizer, whose gradients gradguard does not read: refused."""
    engine, optimizer = _engine(deepspeed, 1, torch.bfloat16, data_types={"grad_accum_dtype": "fp32"})
    try:
        gradguard.watch(engine, optimizer, job="zero-refused", server=addr)
    except ValueError as e:
        return str(e)
    return "accepted"


class Runs:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.server = Server(tmp / "data")
        self.error: BaseException | None = None
        env = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # see conftest
        try:
            mp.spawn(_worker, args=(free_port(), self.server.addr, str(tmp / "out")), nprocs=WORLD)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # the stages it finished have results
            self.error = e
        finally:
            if env is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = env

    def ranks(self, kind: str) -> list[dict]:
        files = [self.tmp / f"out.{kind}.{r}" for r in range(WORLD)]
        if not all(f.exists() for f in files):
            raise AssertionError(f"{kind} did not finish on every rank") from self.error
        return [torch.load(f) for f in files]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = Runs(tmp_path_factory.mktemp("deepspeed"))
    yield r
    r.server.stop()


@pytest.mark.parametrize("stage", STAGES)
def test_zero_reports_and_clips_by_the_whole_models_norms(runs, stage):
    ranks = runs.ranks(str(stage))
    ref = reference()
    worst = 0.0
    for got in ranks:
        assert got["stage"] == stage
        assert got["names"] == list(ref["layers"][0]), got["names"]  # unsharded names, model order
        assert not got["poisoned"] and got["skipped"] == 1 and got["unchanged"]
        nan_norm, _, _, nonfinite = got["measured"][0]
        assert math.isnan(nan_norm) and sum(nonfinite) == 1, nonfinite
        assert got["clipped"] == STEPS and len(got["measured"]) == STEPS + 1
        worst = max(worst, matches_reference(got, ref))
    print(f"ZeRO-{stage}: worst relative error {worst:.1e}")
    stored_as_reference(runs.server, f"zero-{stage}", WORLD, ref)


def test_a_skipped_step_changes_nothing_where_deepspeed_would_take_it(runs):
    for got in runs.ranks("bf16"):
        assert not got["poisoned"] and got["unchanged"]
        assert got["taken"] and math.isfinite(got["norm"]) and got["moved"] and got["finite"]


def test_a_deepspeed_optimizer_it_cannot_read_is_refused(runs):
    for got in runs.ranks("refused"):
        assert "BF16_Optimizer" in got and "not read" in got, got
