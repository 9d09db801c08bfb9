"""The job's layout in the Hello: checked at the call, derived from a
DeviceMesh with named dimensions, and sent to a real `gradguard serve`, which
refuses a rank whose layout disagrees with the job's."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist
from conftest import free_port
from problems import Regression

import gradguard
from gradguard import Layout

STEPS = 20


class FakeMesh:
    """What a DeviceMesh tells about itself, for meshes bigger than one process."""

    def __init__(self, names: tuple[str, ...] | None, shape: tuple[int, ...], coordinate: list[int] | None):
        self.mesh_dim_names = names
        self.shape = shape
        self.coordinate = coordinate

    def size(self, mesh_dim: int | None = None) -> int:
        return math.prod(self.shape) if mesh_dim is None else self.shape[mesh_dim]

    def get_coordinate(self) -> list[int] | None:
        return self.coordinate


def linear():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def until(condition, what: str, timeout: float = 15.0):
    """Polls `condition()` until it returns something true; that."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)
    return value


def test_a_layout_is_checked_at_the_call_naming_the_field():
    with pytest.raises(ValueError, match=r"^layout: data_parallel must be a whole number >= 1, got 0$"):
        Layout(0)
    with pytest.raises(ValueError, match=r"^layout: pipeline_parallel must be a whole number >= 1, got True$"):
        Layout(2, pipeline_parallel=True)
    with pytest.raises(
        ValueError, match=r"^layout: replica_group 4 is not below tensor_parallel 2 × pipeline_parallel 2 = 4$"
    ):
        Layout(2, 2, 2, replica_group=4)
    with pytest.raises(ValueError, match=r"^layout: replica_group must be a whole number >= 0, got -1$"):
        Layout(2, replica_group=-1)

    model, opt = linear()
    for mode in ("enforce", "off"):  # mode "off" checks its arguments too
        with pytest.raises(
            ValueError,
            match=r"^layout: data_parallel 2 × tensor_parallel 1 × pipeline_parallel 4 = 8 ranks, "
            r"replica_group 0, but world_size is 4$",
        ):
            gradguard.watch(model, opt, job="x", mode=mode, rank=0, world_size=4, layout=Layout(2, pipeline_parallel=4))
    with pytest.raises(ValueError, match="^layout must be a gradguard.Layout or a DeviceMesh"):
        gradguard.watch(model, opt, job="x", rank=0, world_size=4, layout=(2, 1, 2))  # type: ignore[arg-type]
    off = gradguard.watch(model, opt, job="x", mode="off", rank=3, world_size=4, layout=Layout(2, 1, 2, 1))
    assert off.layout == Layout(2, 1, 2, 1)
    assert gradguard.watch(model, opt, mode="off").layout is None, "absent unless given"


def test_a_layout_comes_from_a_device_mesh_with_named_dimensions():
    # The last rank of 4 pipeline stages × 2 replicas × 2 tensor-parallel ranks.
    mesh = FakeMesh(("pp", "dp", "tp"), (4, 2, 2), [3, 1, 1])
    assert Layout.from_mesh(mesh) == Layout(2, 2, 4, replica_group=3 * 2 + 1)
    # Every data-parallel dimension is a replica of the same part.
    mesh = FakeMesh(("dp_replicate", "dp_shard", "cp", "tp"), (2, 2, 2, 2), [1, 0, 1, 1])
    assert Layout.from_mesh(mesh) == Layout(8, 2, 1, replica_group=1)

    for mesh, message in [
        (FakeMesh(None, (2, 2), [0, 0]), "dimensions have no names"),
        (FakeMesh(("pp", "ep"), (2, 2), [0, 0]), "dimension 'ep' is none gradguard knows"),
        (FakeMesh(("pp", "dp"), (2, 2), None), "this rank is not in the DeviceMesh"),
    ]:
        with pytest.raises(ValueError, match=message):
            Layout.from_mesh(mesh)
    model, opt = linear()
    with pytest.raises(ValueError, match=r"but world_size is 32 \(the DeviceMesh must span every rank\)$"):
        gradguard.watch(model, opt, job="x", mode="off", rank=0, world_size=32, layout=FakeMesh(("pp",), (4,), [0]))


def test_a_real_device_mesh_gives_the_layout_the_service_takes(server):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("pp", "dp", "tp"))
        run = Regression(peak_lr=0.05)
        with gradguard.watch(run.model, run.optimizer, job="meshed", server=server.addr, layout=mesh) as guard:
            run.train_guarded(guard, steps=STEPS)
        assert guard.layout == Layout(1)
        assert guard.stats.last_error == "", guard.stats
    finally:
        dist.destroy_process_group()
    assert server.wait_for_step("meshed", STEPS).ranks == 1


def test_the_service_refuses_a_rank_whose_layout_disagrees_with_the_jobs(server):
    """Two pipeline stages of one replica each: stage 0 holds the job; a rank
    that says the job is two replicas of one stage is refused, naming the
    field, and stage 1 with the job's layout is taken."""
    guards = []

    def train(rank: int, layout: Layout, seed: int) -> gradguard.Guard:
        run = Regression(peak_lr=0.05, seed=seed)
        options = {"rank": rank, "world_size": 2, "layout": layout, "linger": 0}
        guard = gradguard.watch(run.model, run.optimizer, job="stages", server=server.addr, **options)
        guards.append(guard)
        run.train_guarded(guard, steps=STEPS)
        return guard

    try:
        train(0, Layout(1, pipeline_parallel=2), seed=0)
        server.wait_for_step("stages", STEPS)  # the job is held: a Hello is judged against it
        wrong = train(1, Layout(2), seed=1)
        error = until(lambda: wrong.stats.last_error, "the disagreeing rank is refused")
        assert error.startswith(
            "INVALID_ARGUMENT: field layout: data_parallel 2 × tensor_parallel 1 × pipeline_parallel 1 = 2 ranks, "
            "but the job is laid out as data_parallel 1 × tensor_parallel 1 × pipeline_parallel 2 = 2 ranks"
        ), error
        assert wrong.stats.connects == 0, "it never got a Welcome"
        wrong.close(flush_timeout=0)
        right = train(1, Layout(1, pipeline_parallel=2, replica_group=1), seed=2)
        right.close()
        assert right.stats.last_error == "" and right.stats.sent == STEPS, right.stats
        until(lambda: server.job("stages").ranks == 2, "both stages stored")
    finally:
        for g in guards:
            g.close(flush_timeout=0)
