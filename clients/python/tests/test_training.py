"""Real PyTorch training against a real `gradguard serve` over a socket."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from problems import STEPS, Regression

import gradguard
from gradguard._measure import Measurement
from gradguard._transport import Outbox, Progress, TransportStats
from gradguard._urgency import Urgency
from gradguard.v1 import gradguard_pb2 as pb


def test_a_diverging_run_blows_up_alone_and_is_brought_back_in_enforce_mode(server):
    alone = Regression(peak_lr=0.2)
    alone.train_plain()
    assert alone.blew_up(), "the problem must diverge without the client, or this test proves nothing"
    assert not math.isfinite(alone.losses[-1])

    run = Regression(peak_lr=0.2)
    applied = []
    with gradguard.watch(
        run.model,
        run.optimizer,
        job="diverging",
        server=server.addr,
        scheduler=run.scheduler,
        on_rollback=run.restore,
        on_advice=lambda a, ok: applied.append((a.WhichOneof("action"), ok, a.decided_at_step, guard.stats.steps)),
        # Lock-step with the service: this problem goes from fine to NaN in a
        # dozen steps of about a millisecond each, faster than advice travels.
        max_lag=0,
    ) as guard:
        run.train_guarded(guard)
        stats = guard.stats
    assert all(math.isfinite(v) for v in run.losses), "enforce mode keeps every loss finite"
    assert run.losses[-1] < run.losses[0] / 100, f"and the run trains: {run.losses[0]} -> {run.losses[-1]}"
    assert applied and all(ok for _, ok, _, _ in applied), applied
    assert all(decided == at for _, _, decided, at in applied), "each advice is in force at the step that caused it"
    assert stats.sent == STEPS and stats.dropped == 0 and stats.lag_timeouts == 0

    stored = server.advice("diverging")
    assert len(stored) == len(applied)
    assert all(a.applied == 1 for a in stored), "every advice acknowledged as applied"
    job = server.wait_for_step("diverging", STEPS)
    assert job.layers == 3


def test_observe_mode_leaves_training_bit_identical(server):
    plain = Regression(peak_lr=0.05)
    plain.train_plain()

    observed = Regression(peak_lr=0.05)
    with gradguard.watch(observed.model, observed.optimizer, job="observed", server=server.addr, mode="observe") as g:
        observed.train_guarded(g)
    assert observed.losses == plain.losses
    for a, b in zip(observed.params(), plain.params()):
        assert torch.equal(a, b)
    assert server.wait_for_step("observed", STEPS).last_step == STEPS
    # Steps of a millisecond linger and go to the service together.
    assert g.stats.sent == STEPS and g.stats.messages < STEPS / 4, g.stats


def test_observe_mode_reports_advice_without_applying_it(server):
    run = Regression(peak_lr=0.2)
    seen = []
    with gradguard.watch(
        run.model,
        run.optimizer,
        job="observe-diverging",
        server=server.addr,
        mode="observe",
        on_advice=lambda a, ok: seen.append(ok),
    ) as guard:
        run.train_guarded(guard)
    assert run.blew_up(), "nothing applied: it diverges as without the client"
    # Advice decided before the last steps reached the loop, each declined.
    assert seen and not any(seen)
    stored = server.advice("observe-diverging")
    assert stored and sum(a.declined for a in stored) >= len(seen)


def test_with_the_server_down_the_loop_runs_to_the_end():
    run = Regression(peak_lr=0.05)
    plain = Regression(peak_lr=0.05)
    plain.train_plain(200)
    with gradguard.watch(
        run.model,
        run.optimizer,
        job="nobody-listens",
        server=f"127.0.0.1:{free_port()}",
        buffer=16,
        max_lag=0,
        lag_timeout=0.5,
    ) as g:
        run.train_guarded(g, steps=200)
        stats = g.stats
    assert run.losses == plain.losses, "no advice, no change"
    assert not stats.connected and stats.connects == 0
    assert stats.lag_timeouts == 0, "max_lag never waits for a service that is down"
    assert stats.dropped == 200 - 16, "the bounded buffer keeps the newest 16 summaries"
    assert "UNAVAILABLE" in stats.last_error


def test_max_lag_waits_for_progress_only_while_a_stream_reports_it():
    p = Progress()
    assert p.wait(1, timeout=60), "no stream yet: no wait"
    p.start(active=True, step=5)  # welcomed: the service holds steps through 5
    assert p.wait(5, timeout=60)
    assert not p.wait(6, timeout=0.01), "step 6 is not decided on yet"
    p.advance(6)
    assert p.wait(6, timeout=60)
    p.stop()  # the stream broke
    assert p.wait(100, timeout=60), "nobody waits for a service that is down"
    p.start(active=False, step=0)  # a server that does not report progress
    assert p.wait(100, timeout=60)


def test_a_new_stream_waits_only_for_summaries_it_will_send():
    outbox = Outbox(8, TransportStats())
    assert outbox.settled_through() == 0
    outbox.put_summary(pb.Summary(step=1))
    assert outbox.settled_through() == 0, "step 1 is still to be sent"
    assert outbox.take(timeout=0).summary.step == 1  # it went out on a stream that then broke
    for step in (2, 3):
        outbox.put_summary(pb.Summary(step=step))
    assert outbox.settled_through() == 1, "its progress may never come"
    assert [s.step for s in outbox.take(timeout=0).batch.summaries] == [2, 3]
    assert outbox.settled_through() == 3


def test_summaries_linger_and_leave_together_unless_urgent():
    outbox = Outbox(100, TransportStats(), linger=60.0, max_batch=4)
    outbox.put_summary(pb.Summary(step=1))
    outbox.put_summary(pb.Summary(step=2))
    assert outbox.take(timeout=0.05) is None, "not due for a minute"
    outbox.put_ack(pb.AdviceAck(advice_id=9))
    assert outbox.take(timeout=0).ack.advice_id == 9, "acknowledgements never wait"
    outbox.put_summary(pb.Summary(step=3), urgent=True)
    assert [s.step for s in outbox.take(timeout=0).batch.summaries] == [1, 2, 3]
    assert outbox.take(timeout=0) is None

    for step in range(4, 10):
        outbox.put_summary(pb.Summary(step=step))
    full = outbox.take(timeout=0)
    assert [s.step for s in full.batch.summaries] == [4, 5, 6, 7], "a full batch goes at once"
    assert outbox.take(timeout=0) is None, "the rest lingers"
    outbox.flush()
    assert [s.step for s in outbox.take(timeout=0).batch.summaries] == [8, 9]

    outbox.put_summary(pb.Summary(step=10))
    outbox.close()
    assert outbox.take().summary.step == 10, "closing sends what is queued"
    assert outbox.take() is None

    short = Outbox(100, TransportStats(), linger=0.05)
    short.put_summary(pb.Summary(step=1))
    started = time.monotonic()
    assert short.take(timeout=30).summary.step == 1
    assert 0.04 < time.monotonic() - started < 10, "it left when its linger was over"


def test_only_steps_that_look_anomalous_are_urgent():
    urgency = Urgency()

    def step(norm, loss=2.0, nonfinite=0):
        return urgency(
            Measurement(grad_norm=norm, layer_l2=[norm], layer_max_abs=[], layer_nonfinite=[nonfinite], loss=loss)
        )

    rng = random.Random(0)
    calm = [step(1.0 + 0.05 * rng.gauss(0, 1), 2.0 - 0.001 * i) for i in range(200)]
    assert sum(calm[20:]) <= 4, f"a calm run lingers: {sum(calm[20:])} urgent of 180"
    assert step(3.0), "a gradient spike goes at once"
    assert not step(1.0), "and the baseline did not take it in"
    assert step(1.0, loss=2.6), "a loss 30% over its average goes at once"
    assert step(float("nan")) and step(1.0, nonfinite=3) and step(1.0, loss=float("inf"))


def test_the_jobs_own_thresholds_decide_urgency():
    urgency = Urgency()

    def step(norm, loss=2.0):
        return urgency(Measurement(grad_norm=norm, layer_l2=[norm], layer_max_abs=[], layer_nonfinite=[0], loss=loss))

    urgency.configure(
        pb.UrgencyRules(
            grad_spike_enabled=True,
            grad_alpha=0.97,
            grad_warmup=25,
            grad_z=2.5,
            grad_severe_z=100.0,
            grad_min_clip_ratio=10.0,
            loss_spike_enabled=True,
            loss_min_rise=0.5,
            loss_warmup=25,
        )
    )
    rng = random.Random(0)
    for i in range(100):
        step(1.0 + 0.05 * rng.gauss(0, 1), 2.0 - 0.001 * i)
    assert not step(3.0), "a spike below this job's clip ratio lingers"
    assert not step(1.0, loss=2.6), "a 30% rise is below this job's min_rise"
    assert step(30.0) and step(1.0, loss=3.5)


def test_the_welcome_brings_the_rules_file_thresholds(make_server, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text("[grad_spike]\nz = 3.5\nsevere_z = 9.0\n\n[loss_spike]\nmin_rise = 0.4\n")
    server = make_server(extra=("--rules", str(rules)))
    run = Regression(peak_lr=0.01)
    with gradguard.watch(run.model, run.optimizer, job="own-thresholds", server=server.addr, max_lag=0) as guard:
        # The Welcome is taken in before the connection counts as made.
        deadline = time.monotonic() + 30
        while guard.stats.connects == 0:
            assert time.monotonic() < deadline, f"never connected: {guard.stats}"
            run.train_guarded(guard, steps=1)
        urgency = guard._urgency
        assert (urgency.z, urgency.severe_z, urgency.rise) == (3.5, 9.0, 0.4)


def test_a_server_killed_and_restarted_mid_run_gets_the_stream_back(make_server):
    server = make_server(grpc_port=free_port())
    run = Regression(peak_lr=0.05)
    with gradguard.watch(run.model, run.optimizer, job="restarted", server=server.addr) as guard:
        run.train_guarded(guard, steps=100)
        server.wait_for_step("restarted", 100)
        server.kill()
        run.train_guarded(guard, steps=100)  # buffered meanwhile
        server.start()  # same port, same data directory
        deadline = time.monotonic() + 30
        while guard.stats.connects < 2:
            assert time.monotonic() < deadline, f"no reconnect: {guard.stats}"
            run.train_guarded(guard, steps=1)
        steps = guard.stats.steps
    job = server.wait_for_step("restarted", steps)
    assert job.last_step == steps
    assert guard.stats.dropped == 0


def test_rollback_raises_when_asked_and_the_restored_checkpoint_acknowledges_it(server):
    run = Regression(peak_lr=0.05)
    run.poisoned = range(100, 130)  # a bad shard: NaN inputs
    before = None
    guard = gradguard.watch(
        run.model, run.optimizer, job="raise-rollback", server=server.addr, max_lag=0, on_rollback="raise"
    )
    with pytest.raises(gradguard.RollbackRequested) as raised:
        for s in range(300):
            if s % 25 == 0:
                run.checkpoint(s)
            loss = run.loss()
            if s == 100:
                before = run.params()
            if guard.step(loss):
                run.optimizer.step()
    assert 100 < guard.stats.steps < 130 and raised.value.to_step < 100
    for a, b in zip(run.params(), before):
        assert torch.equal(a, b), "non-finite steps are skipped locally: the NaNs never reach the weights"
    assert all(p.grad is None for p in run.model.parameters()), "raised at the step boundary, gradients cleared"

    restored = run.restore(raised.value.to_step)
    guard.load_state_dict({**guard.state_dict(), "step": restored})
    run.poisoned = range(0)
    run.train_guarded(guard, steps=50)
    guard.close()
    assert math.isfinite(run.losses[-1])
    rollback = [a for a in server.advice("raise-rollback") if a.advice.WhichOneof("action") == "rollback"]
    assert len(rollback) == 1 and rollback[0].applied == 1, rollback


def test_the_example_script_runs_as_is(server):
    script = Path(__file__).resolve().parents[1] / "examples" / "train_mlp.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # see conftest
    out = subprocess.run(
        [sys.executable, str(script), "--server", server.addr, "--steps", "300"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "finished with a finite loss" in out.stdout, out.stdout
    # Run again as written: a new job, not the last run's continued.
    again = subprocess.run(
        [sys.executable, str(script), "--server", server.addr, "--steps", "300"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "finished with a finite loss" in again.stdout, again.stdout
    jobs = [o.stdout.splitlines()[0].split()[1] for o in (out, again)]
    assert jobs[0] != jobs[1] and all(j.startswith("example-mlp-") for j in jobs), jobs
    alone = subprocess.run(
        [sys.executable, str(script), "--no-guard", "--steps", "300"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert "the run diverged" in alone.stdout, alone.stdout


def test_a_restarted_worker_without_a_checkpoint_continues_past_what_the_service_holds(server):
    run = Regression(peak_lr=0.05)
    with gradguard.watch(run.model, run.optimizer, job="restarted-worker", server=server.addr) as first:
        run.train_guarded(first, steps=30)
    server.wait_for_step("restarted-worker", 30)
    # A new process: its step counter starts at 0.
    with gradguard.watch(run.model, run.optimizer, job="restarted-worker", server=server.addr) as second:
        deadline = time.monotonic() + 30
        while second.stats.connects == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        run.train_guarded(second, steps=20)
    assert second.stats.steps == 50
    assert server.wait_for_step("restarted-worker", 50).last_step == 50
