"""Rollback without user code: in-memory snapshots restored on rollback
advice, and what enforce mode does when it cannot roll back."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from problems import Regression

import gradguard
from gradguard._snapshot import Snapshots

# SGD at 1.0 with no warm-up: 0.51 at step 0, 8.3 at step 4, 6e3 at step 6, NaN later.
EXPLODING_LR = 1.0
STEPS = 300


def exploding() -> Regression:
    return Regression(peak_lr=EXPLODING_LR, warmup=1)


def readme_loop(run: Regression, guard: gradguard.Guard, steps: int = STEPS) -> None:
    """The README's three lines, and nothing else: no checkpoint code."""
    for _ in range(steps):
        loss = run.loss()
        if guard.step(loss):
            run.optimizer.step()
        run.scheduler.step()


def test_the_problem_explodes_within_five_steps_without_the_client():
    alone = exploding()
    alone.train_plain(STEPS)
    assert alone.losses[5] > 10 * alone.losses[0], alone.losses[:6]
    assert not math.isfinite(alone.losses[-1])


def test_a_run_exploding_in_its_first_steps_is_rolled_back_from_memory_and_trains(server, caplog):
    run = exploding()
    acted = []
    with gradguard.watch(
        run.model,
        run.optimizer,
        job="snapshots",
        server=server.addr,
        scheduler=run.scheduler,
        snapshot_every=10,
        max_lag=0,
        on_advice=lambda a, ok: acted.append((a.WhichOneof("action"), ok)),
    ) as guard:
        readme_loop(run, guard)
        stats = guard.stats
    assert math.isfinite(run.losses[-1]) and run.losses[-1] < run.losses[0], (run.losses[0], run.losses[-1])
    assert ("rollback", True) in acted, acted
    assert stats.restored >= 1 and stats.fallbacks == 0, stats
    assert 1 <= stats.snapshots <= 2
    stored = [a for a in server.advice("snapshots") if a.advice.WhichOneof("action") == "rollback"]
    assert stored and all(a.applied == 1 for a in stored), stored
    assert not [r for r in caplog.records if "could not roll back" in r.getMessage()]


def test_without_snapshots_the_rollback_is_skip_and_cut_said_once_and_ruined_weights_end_in_a_halt(server, caplog):
    ignored = exploding()
    with gradguard.watch(ignored.model, ignored.optimizer, job="ignored", server=server.addr, mode="observe") as g:
        readme_loop(ignored, g)
    assert not math.isfinite(ignored.losses[-1]), "ignoring the advice, the run goes on as NaN to its end"

    run = exploding()
    with (
        caplog.at_level(logging.WARNING, logger="gradguard"),
        gradguard.watch(run.model, run.optimizer, job="ruined", server=server.addr, max_lag=0) as guard,
    ):
        # No RollbackRequested reaches the loop: the weights blew up before
        # the rollback advice, nothing here can undo that, and the service
        # halts the run rather than let it spend its budget on NaN.
        with pytest.raises(gradguard.TrainingHalted) as halted:
            readme_loop(run, guard)
        stats = guard.stats
    assert "persists" in str(halted.value)
    assert stats.fallbacks >= 1 and stats.restored == 0 and stats.steps < STEPS / 2, stats
    assert stats.lr_scale <= 0.5**stats.fallbacks, stats
    said = [r.getMessage() for r in caplog.records if "could not roll back" in r.getMessage()]
    assert len(said) == 1, said
    assert "snapshot_every" in said[0] and "on_rollback" in said[0]
    stored = [a for a in server.advice("ruined") if a.advice.WhichOneof("action") == "rollback"]
    assert stored and all(a.applied == 0 and a.declined == 1 for a in stored), stored


def test_on_rollback_raise_still_raises(server):
    run = exploding()
    guard = gradguard.watch(run.model, run.optimizer, job="raise", server=server.addr, max_lag=0, on_rollback="raise")
    with pytest.raises(gradguard.RollbackRequested):
        readme_loop(run, guard)
    guard.close()


def test_options_are_checked_at_watch(server):
    run = exploding()
    for bad, message in (
        ({"snapshot_every": 0}, "snapshot_every must be"),
        ({"snapshot_keep": 0}, "snapshot_keep must be"),
        ({"snapshot_memory": -1}, "snapshot_memory must be"),
        ({"on_rollback": "rais"}, "on_rollback must be"),
    ):
        with pytest.raises(ValueError, match=message):
            gradguard.watch(run.model, run.optimizer, job="bad", server=server.addr, **bad)


class Adam:
    """A model with buffers (BatchNorm), Adam's lazily made state, a
    GradScaler and a scheduler: everything a snapshot must bring back."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 1))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
        self.x = torch.randn(32, 8)

    def step(self) -> None:
        self.optimizer.zero_grad()
        loss = self.model(self.x).square().mean()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def state(self) -> list[torch.Tensor]:
        tensors = [t.detach().clone() for t in self.model.state_dict().values()]
        for st in self.optimizer.state.values():
            tensors += [v.clone() for v in st.values() if isinstance(v, torch.Tensor)]
        return [*tensors, self.scaler._scale.clone(), torch.tensor(self.optimizer.param_groups[0]["lr"])]


def test_a_snapshot_brings_back_parameters_buffers_optimizer_scaler_and_scheduler_exactly():
    r = Adam()
    snaps = Snapshots(r.model, r.optimizer, scaler=r.scaler, scheduler=r.scheduler, every=4, keep=2, memory=1 << 30)
    snaps.take(0)
    for s in range(1, 9):
        r.step()
        if snaps.due(s):
            snaps.take(s)
            if s == 4:
                at_4 = r.state()
                epoch_4 = r.scheduler.last_epoch
    assert [s.step for s in snaps.slots] == [4, 8]
    assert snaps.newest_at_or_before(7) == 4 and snaps.newest_at_or_before(3) is None
    r.step()
    snaps.restore(4)
    now = r.state()
    assert len(now) == len(at_4)
    for a, b in zip(now, at_4):
        assert torch.equal(a, b)
    assert r.scheduler.last_epoch == epoch_4
    assert [s.step for s in snaps.slots] == [4], "the snapshot after it held the abandoned run"


def test_a_snapshot_before_the_first_step_restores_a_fresh_optimizer():
    r = Adam()
    snaps = Snapshots(r.model, r.optimizer, scaler=None, scheduler=None, every=100, keep=2, memory=1 << 30)
    snaps.take(0)
    first = [p.detach().clone() for p in r.model.parameters()]
    r.step()
    assert r.optimizer.state
    snaps.restore(0)
    assert not r.optimizer.state, "Adam's state did not exist at step 0"
    for a, b in zip(r.model.parameters(), first):
        assert torch.equal(a, b)
    r.step()  # and the optimizer starts afresh


def test_snapshots_stay_within_their_memory(caplog):
    r = Adam()
    r.step()
    size = sum(t.numel() * t.element_size() for t in r.state()[:-1])
    snaps = Snapshots(r.model, r.optimizer, scaler=r.scaler, scheduler=None, every=1, keep=3, memory=size + size // 2)
    for s in range(5):
        snaps.take(s)
    assert len(snaps.slots) == 1 and snaps.slots[0].step == 4, "one fits"
    assert any("holds 1 snapshot(s)" in r.getMessage() for r in caplog.records)

    tiny = Snapshots(r.model, r.optimizer, scaler=None, scheduler=None, every=1, keep=2, memory=64)
    tiny.take(0)
    assert not tiny.slots and "more than snapshot_memory" in tiny.disabled
    assert not tiny.due(1)
