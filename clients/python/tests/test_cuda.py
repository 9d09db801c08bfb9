"""The CUDA and AMP paths (skipped without a CUDA device; run on a GPU machine
before a release): one host sync per step, measurement after unscaling, and
a diverging fp16 run kept finite against a real server."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gradguard
from gradguard._measure import Layers

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 10),
    ).cuda()


def syncs_during(fn) -> int:
    """Host synchronisations CUDA's sync debug mode reports while `fn` runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (Enabling the mode also warns that it is a prototype: not a sync.)
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


def test_a_guarded_amp_step_syncs_with_the_host_once(server):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A scale that does not overflow: a step with Inf gradients pays a second
    # sync, to count them (see the next test).
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x = torch.randn(512, 256, device="cuda")
    y = torch.randint(0, 10, (512,), device="cuda")
    with gradguard.watch(model, opt, job="cuda-syncs", server=server.addr, scaler=scaler, max_norm=1.0) as guard:

        def forward_backward():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            return loss

        for _ in range(3):  # warm-up: allocations, cuBLAS handles
            loss = forward_backward()
            guard.step(loss)
            scaler.step(opt)
            scaler.update()
        loss = forward_backward()
        assert syncs_during(lambda: guard.step(loss)) == 1
        assert guard.stats.steps == 4 and guard.stats.skipped == 0

        scaler.update(2.0**40)  # overflows: Inf gradients
        loss = forward_backward()
        assert syncs_during(lambda: guard.step(loss)) == 2
        assert guard.stats.skipped == 1


def test_fp16_gradients_are_measured_after_unscaling():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    x = torch.randn(64, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x).float().square().mean()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    reference = math.sqrt(sum(p.grad.double().square().sum().item() for p in model.parameters()))
    m = Layers(model).measure(loss=loss, loss_scale=scaler._scale)
    assert m.grad_norm == pytest.approx(reference, rel=1e-4)
    assert m.loss_scale == 2.0**16 and m.loss == pytest.approx(loss.item())


def test_a_diverging_bf16_run_on_the_gpu_stays_finite_with_the_guard(server):
    from problems import Regression

    def run(guarded: bool):
        r = Regression(peak_lr=0.2)
        r.model.cuda()
        r.x, r.y = r.x.cuda(), r.y.cuda()
        guard = None
        if guarded:
            guard = gradguard.watch(
                r.model, r.optimizer, job="cuda-bf16", server=server.addr, scheduler=r.scheduler, on_rollback=r.restore
            )
        losses = []
        for s in range(400):
            if s % 25 == 0:
                r.checkpoint(s)
            r.optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(r.model(r.x).float(), r.y)
            loss.backward()
            losses.append(loss.item())
            if guard is None or guard.step(loss):
                r.optimizer.step()
            r.scheduler.step()
        if guard:
            guard.close()
        return losses

    alone = run(False)
    assert not all(math.isfinite(v) and v < 100 * alone[0] for v in alone), "diverges alone"
    guarded = run(True)
    assert all(math.isfinite(v) for v in guarded) and guarded[-1] < guarded[0]


def test_snapshots_copy_without_a_host_sync_and_restore_exactly():
    from gradguard._snapshot import Snapshots

    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(64, 256, device="cuda")

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    snaps = Snapshots(model, optimizer, scaler=scaler, scheduler=None, every=1, keep=2, memory=1 << 32)
    step()
    assert syncs_during(lambda: snaps.take(1)) == 0, "the copy runs on a side stream"
    kept = [t.detach().cpu().clone() for t in model.parameters()]
    kept += [v.cpu().clone() for s in optimizer.state.values() for v in s.values() if v.is_cuda]
    step()  # waits (on the GPU) for the copy before it writes the parameters
    step()
    snaps.restore(1)
    now = [t.detach().cpu() for t in model.parameters()]
    now += [v.cpu() for s in optimizer.state.values() for v in s.values() if v.is_cuda]
    assert all(torch.equal(a, b) for a, b in zip(now, kept))
