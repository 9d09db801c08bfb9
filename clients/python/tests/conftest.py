"""Fixtures: a real `gradguard serve` per test (started on free ports, ready
once it prints its `listening` line), a real tansu broker for the Kafka test,
and a Query client to check what the service stored.

The server binary comes from `$GRADGUARD_BIN` (the Rust test that runs this
suite sets it), else the workspace's debug or release build.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch

from gradguard.v1 import gradguard_pb2 as pb
from gradguard.v1 import gradguard_pb2_grpc

ROOT = Path(__file__).resolve().parents[3]

# One intra-op thread: these tests check behaviour, and on a 2-core machine
# shared with the server process OpenMP's spinning threads make steps 30x slower.
torch.set_num_threads(1)


def gradguard_bin() -> str:
    explicit = os.environ.get("GRADGUARD_BIN")
    if explicit:
        return explicit
    for build in ("debug", "release"):
        path = ROOT / "target" / build / "gradguard"
        if path.exists():
            return str(path)
    pytest.fail("no gradguard binary: run `cargo build` or set GRADGUARD_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `gradguard serve` process."""

    def __init__(self, data_dir: Path, grpc_port: int = 0, extra: tuple[str, ...] = ()):
        self.data_dir = data_dir
        self.grpc_port = grpc_port
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                gradguard_bin(),
                "serve",
                "--grpc-addr",
                f"127.0.0.1:{self.grpc_port}",
                "--metrics-addr",
                "127.0.0.1:0",
                "--data-dir",
                str(self.data_dir),
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("listening"):
            self.proc.kill()
            raise RuntimeError(f"gradguard serve did not start: {line!r} (exit {self.proc.wait()})")
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        self.addr = fields["grpc"]
        self.metrics = fields["metrics"]
        self.grpc_port = int(self.addr.rsplit(":", 1)[1])

    def kill(self) -> None:
        """kill -9: no goodbye to the streams."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self) -> gradguard_pb2_grpc.QueryStub:
        return gradguard_pb2_grpc.QueryStub(grpc.insecure_channel(self.addr))

    def job(self, job: str) -> pb.Job:
        return self.query().GetJob(pb.GetJobRequest(job=job))

    def advice(self, job: str) -> list[pb.StoredAdvice]:
        req = pb.ListAdviceRequest(filter=pb.Filter(job=job), page_size=1000)
        return list(self.query().ListAdvice(req).advice)

    def wait_for_step(self, job: str, step: int, timeout: float = 30.0) -> pb.Job:
        """The job once the service has stored `step` (polls the store)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.job(job)
                if last.HasField("last_step") and last.last_step >= step:
                    return last
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            time.sleep(0.05)
        raise AssertionError(f"job {job} never reached step {step}: {last}")


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "data")
    yield s
    s.stop()


@pytest.fixture
def make_server(tmp_path):
    """Servers with options, all stopped at the end."""
    started: list[Server] = []

    def make(**kwargs) -> Server:
        s = Server(tmp_path / f"data{len(started)}", **kwargs)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def tansu_bin() -> str:
    for candidate in (os.environ.get("TANSU"), shutil.which("tansu"), str(Path.home() / ".cargo" / "bin" / "tansu")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("the Kafka test needs tansu: cargo install tansu --locked --features dynostore (.ci/run does)")


@pytest.fixture
def broker():
    """A tansu broker in memory on a free loopback port; yields `host:port`."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, LISTENER_URL=url, ADVERTISED_LISTENER_URL=url, RUST_LOG="warn")
    proc = subprocess.Popen(
        [tansu_bin(), "broker", "--storage-engine", "memory://tansu/"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"tansu did not listen on port {port}")
            time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    proc.kill()
    proc.wait()
