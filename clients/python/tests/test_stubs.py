"""The committed stubs on the oldest runtimes they claim (protobuf 5.26.1,
grpcio 1.63.0): a worker stream and a query against a real service, from a
second Python environment that has only those (made by .ci/run:
`clients/python/.venv-compat`; `GRADGUARD_COMPAT_PYTHON` names another)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
COMPAT = Path(os.environ.get("GRADGUARD_COMPAT_PYTHON", HERE.parent / ".venv-compat" / "bin" / "python"))

SCRIPT = r"""
import sys
import google.protobuf, grpc
from gradguard.v1 import gradguard_pb2 as pb, gradguard_pb2_grpc as rpc

addr = sys.argv[1]
channel = grpc.insecure_channel(addr)
hello = pb.WorkerMessage(hello=pb.Hello(job="old-runtimes", rank=0, world_size=1, layer_names=["a", "b"]))
summaries = [
    pb.WorkerMessage(summary=pb.Summary(step=s, time=1.7e9 + s, loss=2.0, grad_norm=1.0, layer_l2=[0.6, 0.8]))
    for s in (1, 2, 3)
]
replies = rpc.IngestStub(channel).Stream(iter([hello, *summaries]))
welcome = next(replies).welcome
assert welcome.HasField("urgency") and welcome.urgency.grad_z == 2.5, welcome
for _ in replies:  # the stream ends once the service stored what it was sent
    pass
job = rpc.QueryStub(channel).GetJob(pb.GetJobRequest(job="old-runtimes"))
print(google.protobuf.__version__, grpc.__version__, job.last_step, job.layers)
"""


def test_the_stubs_work_on_protobuf_5_and_its_grpcio(server):
    if not COMPAT.exists():
        pytest.skip(
            f"no second environment at {COMPAT}: python3 -m venv clients/python/.venv-compat && "
            "clients/python/.venv-compat/bin/pip install protobuf==5.26.1 grpcio==1.63.0 (.ci/run does)"
        )
    out = subprocess.run(
        [str(COMPAT), "-c", SCRIPT, server.addr],
        env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    protobuf, grpcio, last_step, layers = out.stdout.split()
    assert (protobuf, grpcio) == ("5.26.1", "1.63.0")
    assert (last_step, layers) == ("3", "2")
