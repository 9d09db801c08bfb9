"""How each kind of advice is applied, advice by advice (no server needed:
the advice is handed to the guard as its connection thread would), and the
cross-rank agreement under DDP against a real server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import Server, free_port
from problems import Regression

import gradguard
from gradguard.v1 import gradguard_pb2 as pb


def dead_server() -> str:
    return f"127.0.0.1:{free_port()}"


def linear(lr: float = 1.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def backward(model, scale: float = 1.0) -> None:
    model.zero_grad()
    (model(torch.ones(1, 4)).sum() * scale).backward()  # gradient: ones * scale


def advise(guard, id: int, step: int, **action) -> None:
    guard._receive(pb.Advice(id=id, job=guard.job, decided_at_step=step, apply_from_step=step, **action))


def test_scale_lr_rides_on_top_of_the_scheduler():
    model, opt = linear(lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    acks = []
    with gradguard.watch(
        model, opt, job="lr", server=dead_server(), scheduler=sched, on_advice=lambda a, ok: acks.append(ok)
    ) as g:
        advise(g, 1, 1, scale_lr=pb.ScaleLr(factor=0.1))
        for lr in (1.0, 0.5, 0.25):
            before = model.weight.detach().clone()
            backward(model)
            assert g.step()
            opt.step()
            # SGD: the update is lr * gradient (ones), with the advised scale.
            torch.testing.assert_close(before - model.weight.detach(), torch.full((1, 4), lr * 0.1))
            assert opt.param_groups[0]["lr"] == lr, "the scheduler's own value is back after the step"
            sched.step()
        assert g.stats.lr_scale == pytest.approx(0.1) and acks == [True]


def test_clip_advice_stays_until_replaced_and_max_norm_is_a_standing_clip():
    model, opt = linear()
    with gradguard.watch(model, opt, job="clip", server=dead_server(), max_norm=10.0) as g:
        backward(model, scale=100.0)  # norm 200
        assert g.step()
        assert model.weight.grad.norm().item() == pytest.approx(10.0, rel=1e-5)
        advise(g, 1, 2, clip_gradients=pb.ClipGradients(max_norm=0.5))
        for _ in range(3):
            backward(model, scale=100.0)
            assert g.step()
            assert model.weight.grad.norm().item() == pytest.approx(0.5, rel=1e-5)
        backward(model, scale=0.01)  # under every limit: untouched
        g.step()
        torch.testing.assert_close(model.weight.grad, torch.full((1, 4), 0.01))


def test_skip_advice_for_this_step_skips_it_and_late_skip_advice_is_declined():
    model, opt = linear()
    acks = []
    with gradguard.watch(
        model, opt, job="skip", server=dead_server(), on_advice=lambda a, ok: acks.append((a.id, ok))
    ) as g:
        advise(g, 1, 1, skip_step=pb.SkipStep())
        backward(model)
        assert g.step() is False and model.weight.grad is None
        before = model.weight.detach().clone()
        opt.step()
        assert torch.equal(model.weight, before), "an unchecked optimizer.step() is harmless"
        advise(g, 2, 1, skip_step=pb.SkipStep())  # for step 1, arriving at step 2
        backward(model)
        assert g.step() is True
        assert acks == [(1, True), (2, False)] and g.stats.skipped == 1


def test_loss_scale_advice_sets_the_grad_scaler():
    model, opt = linear()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with gradguard.watch(model, opt, job="amp", server=dead_server(), scaler=scaler) as g:
        advise(g, 1, 1, scale_loss_scale=pb.ScaleLossScale(factor=0.25))
        model.zero_grad()
        scaler.scale(model(torch.ones(1, 4)).sum()).backward()
        assert g.step()
        torch.testing.assert_close(model.weight.grad, torch.ones(1, 4))  # measured after unscaling
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == 256.0


def test_halt_raises_at_the_step_boundary():
    model, opt = linear()
    with gradguard.watch(model, opt, job="halt", server=dead_server()) as g:
        advise(g, 1, 1, halt=pb.Halt())
        backward(model)
        with pytest.raises(gradguard.TrainingHalted):
            g.step()
        assert model.weight.grad is None


def test_advice_for_another_rank_is_ignored():
    model, opt = linear()
    with gradguard.watch(model, opt, job="ranks", server=dead_server(), rank=1, world_size=4) as g:
        g._receive(pb.Advice(id=1, job="ranks", target_rank=2, apply_from_step=1, halt=pb.Halt()))
        backward(model)
        assert g.step()


def test_state_dict_carries_the_applied_advice_into_a_new_guard():
    model, opt = linear()
    with gradguard.watch(model, opt, job="ckpt", server=dead_server()) as g:
        advise(g, 1, 1, scale_lr=pb.ScaleLr(factor=0.5))
        advise(g, 2, 1, clip_gradients=pb.ClipGradients(max_norm=0.3))
        backward(model)
        g.step()
        state = g.state_dict()
    with gradguard.watch(model, opt, job="ckpt", server=dead_server()) as h:
        h.load_state_dict(state)
        assert (h.stats.lr_scale, h.stats.clip_norm, h.stats.steps) == (0.5, 0.3, 1)


def test_bad_arguments_name_the_argument():
    model, opt = linear()
    with pytest.raises(ValueError, match="mode"):
        gradguard.watch(model, opt, job="x", mode="fix")
    with pytest.raises(ValueError, match="job"):
        gradguard.watch(model, opt, job=" ")
    with pytest.raises(ValueError, match="max_norm"):
        gradguard.watch(model, opt, job="x", max_norm=-1.0)
    with pytest.raises(ValueError, match="max_lag"):
        gradguard.watch(model, opt, job="x", max_lag=-1)
    with pytest.raises(ValueError, match="max_lag needs the gRPC transport"):
        gradguard.watch(model, opt, job="x", max_lag=0, kafka_brokers="localhost:9092")
    with pytest.raises(ValueError, match="lag_timeout"):
        gradguard.watch(model, opt, job="x", max_lag=0, lag_timeout=-1)


# ------------------------------------------------------------------ DDP


def _ddp_rank(rank: int, world: int, port: int, server: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    run = Regression(peak_lr=0.2)
    ddp = torch.nn.parallel.DistributedDataParallel(run.model)
    applied = []
    with gradguard.watch(
        ddp,
        run.optimizer,
        job="ddp",
        server=server,
        scheduler=run.scheduler,
        on_rollback=run.restore,
        on_advice=lambda a, ok: applied.append([a.id, guard.stats.steps, ok]),
        max_lag=0,  # advice in force within a step or two, however slow the machine
    ) as guard:
        for s in range(300):
            if s % 25 == 0:
                run.checkpoint(s)
            run.optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(run.x), run.y)
            loss.backward()
            run.losses.append(loss.item())
            if guard.step(loss):
                run.optimizer.step()
            run.scheduler.step()
    with open(out, "w") as f:
        json.dump({"applied": applied, "layers": guard.layers.names, "last_loss": run.losses[-1]}, f)
    dist.destroy_process_group()


def test_every_ddp_rank_applies_the_same_advice_at_the_same_step(tmp_path):
    server = Server(tmp_path / "data")
    try:
        outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_ddp_rank, args=(r, 2, port, server.addr, outs[r])) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        results = [json.loads(Path(o).read_text()) for o in outs]
        assert results[0]["applied"], "the diverging run got advice"
        assert results[0]["applied"] == results[1]["applied"], "same advice, same steps, on both ranks"
        assert results[0]["layers"] == ["0", "2", "4"], "DDP's module. prefix is not part of the layer names"
        job = server.wait_for_step("ddp", 300)
        assert job.ranks == 2 and job.world_size == 2
    finally:
        server.stop()
