"""Configuration: options checked at the call, the mode and the job from the
environment, mode "off", advice logged once per job, and the measured norm."""

from __future__ import annotations

import inspect
import logging
import socket
import threading

import pytest
import torch
from conftest import free_port
from problems import STEPS, Regression

import gradguard
from gradguard import Guard
from gradguard.v1 import gradguard_pb2 as pb

LAUNCHER = ("GRADGUARD_JOB", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "GRADGUARD_MODE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)


def dead_server() -> str:
    return f"127.0.0.1:{free_port()}"


def linear():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    return model, torch.optim.SGD(model.parameters(), lr=1.0)


def backward(model, scale: float = 1.0) -> None:
    model.zero_grad()
    (model(torch.ones(1, 4)).sum() * scale).backward()  # gradient: ones * scale, norm 2 * scale


# ------------------------------------------------------------ options


def test_a_mistyped_option_fails_at_watch_naming_it_and_the_valid_ones():
    model, opt = linear()
    with pytest.raises(TypeError) as e:
        gradguard.watch(model, opt, job="x", server=dead_server(), max_nrom=1.0)
    message = str(e.value)
    assert message.startswith("gradguard.watch: unknown option 'max_nrom' (did you mean 'max_norm'?); valid options: ")
    valid = message.split("valid options: ")[1].split(", ")
    keyword_only = [p.name for p in inspect.signature(gradguard.watch).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert valid == sorted(keyword_only)
    assert {"buffer", "job", "kafka_brokers", "max_norm", "mode", "server", "token"} <= set(valid)

    with pytest.raises(TypeError, match=r"^gradguard.Guard: unknown option 'jbo' \(did you mean 'job'\?\); valid"):
        Guard(model, opt, jbo="x")
    with pytest.raises(TypeError, match=r"unknown option 'colour'; valid options: buffer, job, "):
        gradguard.watch(model, opt, colour="blue")  # nothing close: no suggestion


def test_the_adapters_check_their_options_when_made():
    pytest.importorskip("lightning")
    from gradguard.lightning import GradGuardCallback

    with pytest.raises(TypeError, match=r"GradGuardCallback: unknown option 'max_lags' \(did you mean 'max_lag'\?\)"):
        GradGuardCallback(job="x", max_lags=0)
    with pytest.raises(TypeError, match="unknown option 'scaler'"):  # Lightning's own, from its precision plugin
        GradGuardCallback(job="x", scaler=None)
    GradGuardCallback(max_lag=0)  # the job may come from the environment when training starts


def test_watch_takes_exactly_the_options_of_guard():
    watch = inspect.signature(gradguard.watch).parameters
    guard = dict(inspect.signature(Guard.__init__).parameters)
    del guard["self"]
    assert [(p.name, p.kind, p.default) for p in watch.values()] == [
        (p.name, p.kind, p.default) for p in guard.values()
    ]


def test_a_mistyped_mode_fails_naming_the_valid_modes():
    model, opt = linear()
    with pytest.raises(ValueError, match=r"^mode must be one of enforce, observe, off; got 'enforced' \(did you mean"):
        gradguard.watch(model, opt, job="x", mode="enforced")  # type: ignore[arg-type]


# ------------------------------------------------------------ environment


def test_the_mode_from_the_environment_and_the_argument_wins(monkeypatch):
    model, opt = linear()
    monkeypatch.setenv("GRADGUARD_MODE", "observe")
    with gradguard.watch(model, opt, job="x", server=dead_server()) as g:
        assert g.mode == "observe"
    monkeypatch.setenv("GRADGUARD_MODE", "off")
    with gradguard.watch(model, opt, job="x", server=dead_server(), mode="enforce") as g:
        assert g.mode == "enforce"
    monkeypatch.setenv("GRADGUARD_MODE", " Off\n")
    with gradguard.watch(model, opt) as g:
        assert g.mode == "off"


def test_a_bad_mode_in_the_environment_names_the_variable(monkeypatch):
    model, opt = linear()
    monkeypatch.setenv("GRADGUARD_MODE", "enforcing")
    with pytest.raises(
        ValueError, match=r"^\$GRADGUARD_MODE='enforcing' is not a mode .*valid modes: enforce, observe"
    ):
        gradguard.watch(model, opt, job="x")
    # The argument wins: the variable is not read.
    with gradguard.watch(model, opt, job="x", server=dead_server(), mode="observe") as g:
        assert g.mode == "observe"


@pytest.mark.parametrize(
    ("env", "job"),
    [
        ({"GRADGUARD_JOB": "named", "TORCHELASTIC_RUN_ID": "tr-1", "SLURM_JOB_ID": "4242"}, "named"),
        ({"TORCHELASTIC_RUN_ID": "tr-1", "SLURM_JOB_ID": "4242"}, "tr-1"),
        ({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "4242"}, "4242"),  # torchrun without a run id
        ({"SLURM_JOB_ID": "4242"}, "4242"),
        ({"GRADGUARD_JOB": " ", "SLURM_JOB_ID": "4242"}, "4242"),
    ],
)
def test_the_job_defaults_to_the_environment_then_the_launcher(monkeypatch, env, job):
    model, opt = linear()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with gradguard.watch(model, opt, server=dead_server()) as g:
        assert g.job == job
    with gradguard.watch(model, opt, job="given", server=dead_server()) as g:
        assert g.job == "given", "the argument wins"


def test_without_a_job_name_anywhere_it_says_how_to_give_one(monkeypatch):
    model, opt = linear()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ValueError, match=r"no job name: pass job= .* or set \$GRADGUARD_JOB"):
        gradguard.watch(model, opt, server=dead_server())


def test_the_launchers_job_reaches_the_service(server, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "31337")
    run = Regression(peak_lr=0.05)
    with gradguard.watch(run.model, run.optimizer, server=server.addr) as g:
        run.train_guarded(g, steps=5)
    assert server.wait_for_step("31337", 5).last_step == 5


# ------------------------------------------------------------ mode off


def test_mode_off_guards_nothing_and_never_dials(monkeypatch, tmp_path):
    # A server that records every connection: none may come.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    addr = f"127.0.0.1:{listener.getsockname()[1]}"
    # Nor are the token or TLS files read, nor a job name needed.
    monkeypatch.setenv("GRADGUARD_TOKEN_FILE", str(tmp_path / "missing"))
    monkeypatch.setenv("GRADGUARD_MODE", "off")
    model, opt = linear()
    threads = threading.active_count()
    with gradguard.watch(model, opt, server=addr, max_norm=0.1, tls_ca=tmp_path / "missing.pem") as g:
        assert threading.active_count() == threads, "no connection thread"
        for _ in range(5):
            backward(model, scale=100.0)
            assert g.step(torch.tensor(1.0)) is True
            torch.testing.assert_close(model.weight.grad, torch.full((1, 4), 100.0))  # not clipped
            opt.step()
        assert g.last_grad_norm is None
        assert (g.job, g.mode) == ("", "off")
        stats = g.stats
    g.close()  # idempotent
    assert (stats.steps, stats.sent, stats.messages, stats.connects, stats.advice_received) == (0, 0, 0, 0, 0)
    assert not opt._optimizer_step_pre_hooks, "no optimizer hook"
    with pytest.raises(socket.timeout):
        listener.accept()
    listener.close()
    with pytest.raises(RuntimeError, match="closed"):
        g.step()


def test_mode_off_still_checks_the_arguments():
    model, opt = linear()
    with pytest.raises(ValueError, match="max_norm"):
        gradguard.watch(model, opt, mode="off", max_norm=-1.0)
    with pytest.raises(TypeError, match="unknown option"):
        gradguard.watch(model, opt, mode="off", max_nrom=1.0)


# ------------------------------------------------------------ advice logs


def advise(guard, id: int, **fields) -> None:
    guard._receive(pb.Advice(id=id, job=guard.job, decided_at_step=1, apply_from_step=1, **fields))


def advice_levels(caplog) -> list[tuple[str, int]]:
    return [(r.getMessage().split(":")[0], r.levelno) for r in caplog.records if "gradguard advice" in r.getMessage()]


def test_job_wide_advice_is_a_warning_on_rank_0_only(caplog):
    caplog.set_level(logging.DEBUG, logger="gradguard")
    model, opt = linear()
    clip = {"clip_gradients": pb.ClipGradients(max_norm=1.0)}
    with gradguard.watch(model, opt, job="logs", server=dead_server(), rank=0, world_size=2) as g0:
        advise(g0, 1, **clip)
    with gradguard.watch(model, opt, job="logs", server=dead_server(), rank=1, world_size=2) as g1:
        advise(g1, 1, **clip)
        advise(g1, 2, target_rank=1, inspect_worker=pb.InspectWorker())  # for this rank alone: it tells
        advise(g1, 3, target_rank=0, inspect_worker=pb.InspectWorker())  # for another: not its business
    assert advice_levels(caplog) == [
        ("gradguard advice 1 at step 1", logging.WARNING),
        ("gradguard advice 1 at step 1", logging.DEBUG),
        ("gradguard advice 2 at step 1", logging.WARNING),
    ]


def test_advice_from_a_real_service_is_a_warning_on_rank_0_only(server, caplog):
    caplog.set_level(logging.DEBUG, logger="gradguard")
    runs = [Regression(peak_lr=0.2), Regression(peak_lr=0.2)]  # the same diverging run on two ranks
    guards = [
        gradguard.watch(
            r.model, r.optimizer, job="two-ranks", server=server.addr, rank=rank, world_size=2, mode="observe"
        )
        for rank, r in enumerate(runs)
    ]
    for _ in range(STEPS):
        for run, guard in zip(runs, guards):
            loss = run.loss()
            if guard.step(loss):
                run.optimizer.step()
            run.scheduler.step()
    for g in guards:
        g.close()
    records = [r for r in caplog.records if r.getMessage().startswith("gradguard advice")]
    by_rank = {0: [], 1: []}
    for r in records:
        by_rank[int(r.threadName.rsplit("-", 1)[1])].append(r.levelno)  # the connection thread of each rank
    assert by_rank[0] and set(by_rank[0]) == {logging.WARNING}, by_rank
    assert by_rank[1] and set(by_rank[1]) == {logging.DEBUG}, by_rank


# ------------------------------------------------------------ the norm


def test_last_grad_norm_is_the_norm_measured_before_clipping():
    model, opt = linear()
    with gradguard.watch(model, opt, job="norm", server=dead_server(), max_norm=1.0) as g:
        assert g.last_grad_norm is None
        backward(model, scale=3.0)
        assert g.step()
        assert g.last_grad_norm == pytest.approx(6.0)
        assert model.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5), "clipped, the norm reported is not"
        backward(model, scale=float("inf"))
        assert not g.step()
        assert g.last_grad_norm == float("inf") or g.last_grad_norm != g.last_grad_norm  # inf or nan
