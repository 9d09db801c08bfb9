"""Sharded and parallel models: the norms a guard measures, reports and clips
by are the whole model's, on every rank.

Each test trains a small model in spawned processes (gloo on the CPU) under
DDP, FSDP2 (also HSDP on a 2x2 mesh), FSDP1 or tensor parallelism, with a real
`gradguard serve`, and compares with one process training an unsharded copy
(same weights, same total batch) clipped by `torch.nn.utils.clip_grad_norm_`.
The processes of one world size are spawned once for all its kinds.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import Server, free_port

import gradguard
from gradguard._measure import layer_name
from gradguard._snapshot import Snapshots

STEPS = 3
BATCH = 8
LR = 0.1
MAX_NORM = 0.2  # below every step's norm: each step is clipped
REL = 1e-5


class Net(torch.nn.Module):
    """Shards split some parameters unevenly (three rows over two ranks, one
    over two) and FSDP1's flat parameter mid-parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(5, 10)
        self.down = torch.nn.Linear(10, 3)
        self.head = torch.nn.Linear(3, 1)  # left whole under tensor parallelism: replicated

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 5, generator=g), torch.randn(BATCH, 1, generator=g)


def clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").removeprefix("module.")


def reference(steps: int = STEPS, max_norm: float = MAX_NORM) -> dict:
    """One process, the whole model and batch."""
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    norms, layers, max_abs = [], [], []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        sq: dict[str, float] = {}
        top: dict[str, float] = {}
        for n, p in net.named_parameters():
            layer = layer_name(n)
            sq[layer] = sq.get(layer, 0.0) + float(p.grad.double().square().sum())
            top[layer] = max(top.get(layer, 0.0), float(p.grad.abs().max()))
        layers.append({k: math.sqrt(v) for k, v in sq.items()})
        max_abs.append(top)
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)))
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        opt.step()
    return {
        "norms": norms,
        "layers": layers,
        "max_abs": max_abs,
        "grads": grads,
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
    }


def _wrap(net: Net, kind: str, world: int):
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(net)
    if kind in ("fsdp1", "fsdp1-orig"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        orig = kind == "fsdp1-orig"
        cpu = torch.device("cpu")
        net.up = FSDP(net.up, use_orig_params=orig, device_id=cpu)
        return FSDP(net, use_orig_params=orig, device_id=cpu)
    from torch.distributed.device_mesh import init_device_mesh

    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(net.up)
        fully_shard(net)
        return net
    if kind == "hsdp":  # FSDP2 on a 2-D mesh: replicated across the first dimension, sharded along the second
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(net.up, mesh=mesh)
        fully_shard(net, mesh=mesh)
        return net
    if kind == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,))
        return parallelize_module(net, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    raise ValueError(kind)


def _local_batch(kind: str, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    if kind == "tp":  # every rank sees the whole batch
        return x, y
    return x.chunk(world)[rank], y.chunk(world)[rank]  # data parallel over all ranks


def _full_grads(model, kind: str) -> dict[str, torch.Tensor]:
    """The unsharded gradients (collective)."""
    if kind == "ddp":
        return {clean(n): p.grad.clone() for n, p in model.named_parameters()}
    if kind == "fsdp1-orig":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, with_grads=True):
            return {clean(n): p.grad.clone() for n, p in model.named_parameters()}
    if kind == "fsdp1":
        return _fsdp1_flat_grads(model)
    return {
        n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
        for n, p in model.named_parameters()
    }


def _fsdp1_flat_grads(model) -> dict[str, torch.Tensor]:
    """Reassembles the original gradients from every rank's flat shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    mine = []
    for prefix, m in model.named_modules():
        if isinstance(m, FSDP) and m._handle is not None:
            fp = m._handle.flat_param
            for fqn, info, shape in zip(fp._fqns, fp._shard_param_infos, fp._shapes):
                if info.in_shard:
                    piece = fp.grad[info.offset_in_shard : info.offset_in_shard + info.numel_in_shard]
                    name = clean(f"{prefix}.{fqn}" if prefix else fqn)
                    mine.append((name, tuple(shape), info.intra_param_start_idx, piece.clone()))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    full: dict[str, torch.Tensor] = {}
    for pieces in everyone:
        for name, shape, start, piece in pieces:
            flat = full.setdefault(name, torch.zeros(shape)).view(-1)
            flat[start : start + piece.numel()] = piece
    return full


def _full_params(model, kind: str) -> dict[str, torch.Tensor]:
    if kind in ("fsdp1", "fsdp1-orig"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model):
            return {clean(n): p.detach().clone() for n, p in model.named_parameters()}
    return {
        clean(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def _worker(rank: int, world: int, port: int, kinds: tuple[str, ...], addr: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a rank that died does not hang the others for half an hour
    )
    try:
        for kind in kinds:
            torch.save(_train(kind, rank, world, addr), f"{out}.{kind}.{rank}")
    finally:
        dist.destroy_process_group()


def _train(kind: str, rank: int, world: int, addr: str) -> dict:
    model = _wrap(Net(), kind, world)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    guard = gradguard.watch(model, opt, job=f"sharded-{kind}", server=addr, max_norm=MAX_NORM, max_abs=True, linger=0)
    measured = []
    send = guard._send

    def record(step, m):
        measured.append((m.grad_norm, dict(zip(guard.layers.names, m.layer_l2)), m.layer_max_abs, m.layer_nonfinite))
        send(step, m)

    guard._send = record
    # First a step with one NaN in one rank's shard (on every rank under
    # DDP, whose gradients are alike): every rank skips it, counting one.
    x, y = _local_batch(kind, 0, rank, world)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    if kind == "ddp" or rank == 0:
        with torch.no_grad():
            grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters()]
            next(g for g in grads if g is not None and g.numel()).view(-1)[0] = math.nan
    poisoned = guard.step(loss)
    grads = None
    for step in range(STEPS):
        x, y = _local_batch(kind, step, rank, world)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        ok = guard.step(loss)
        if step == STEPS - 1:
            grads = _full_grads(model, kind)
        if ok:
            opt.step()
    guard.close()
    # An in-memory snapshot of this rank's shard, a step that moves the
    # weights, and the snapshot restored: the whole model is as it was.
    snaps = Snapshots(model, opt, scaler=None, scheduler=None, every=1, keep=1, memory=1 << 30)
    snaps.take(STEPS)
    kept = _full_params(model, kind)
    x, y = _local_batch(kind, STEPS, rank, world)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    moved = _full_params(model, kind)
    snaps.restore(STEPS)
    snaps.close()
    return {
        "snapshot": (kept, moved, _full_params(model, kind)),
        "names": guard.layers.names,
        "sharded": guard.layers.sharding is not None,
        "measured": measured,
        "poisoned": poisoned,
        "skipped": guard.stats.skipped,
        "clipped": guard.stats.clipped,
        "grads": grads,
        "params": _full_params(model, kind),
    }


# One spawn per world size trains every kind of that size in turn: starting
# processes and importing torch in them is most of the time.
WORLDS = {2: ("ddp", "fsdp2", "fsdp1", "fsdp1-orig", "tp"), 4: ("hsdp",)}


class Runs:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.server = Server(tmp / "data")
        self.spawned: dict[int, BaseException | None] = {}

    def ranks(self, kind: str, world: int) -> list[dict]:
        if world not in self.spawned:
            env = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"  # see conftest
            try:
                args = (world, free_port(), WORLDS[world], self.server.addr, str(self.tmp / "out"))
                mp.spawn(_worker, args=args, nprocs=world)
                self.spawned[world] = None
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # the kinds it finished have results
                self.spawned[world] = e
            finally:
                if env is None:
                    os.environ.pop("OMP_NUM_THREADS")
                else:
                    os.environ["OMP_NUM_THREADS"] = env
        files = [self.tmp / f"out.{kind}.{r}" for r in range(world)]
        if not all(f.exists() for f in files):
            raise AssertionError(f"{kind} did not finish on every rank") from self.spawned[world]
        return [torch.load(f) for f in files]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = Runs(tmp_path_factory.mktemp("sharded"))
    yield r
    r.server.stop()


def _metric(server, job: str) -> float:
    text = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=10).read().decode()
    m = re.search(rf'^gradguard_job_grad_norm{{training_job="{re.escape(job)}"}} (\S+)$', text, re.MULTILINE)
    assert m, text
    return float(m.group(1))


def _close(a: float, b: float) -> float:
    rel = abs(a - b) / max(abs(b), 1e-12)
    assert rel <= REL, f"{a} vs {b}: relative error {rel:.2e}"
    return rel


def matches_reference(got: dict, ref: dict) -> float:
    """Asserts that one rank measured the reference's norms on every step
    after the poisoned one, and ended with its clipped gradients and its
    parameters; returns the worst relative error of the norms."""
    worst = 0.0
    for (norm, layers, max_abs, nonfinite), want_norm, want_layers, want_max in zip(
        got["measured"][1:], ref["norms"], ref["layers"], ref["max_abs"]
    ):
        assert not any(nonfinite)
        worst = max(worst, _close(norm, want_norm))
        for layer, v in layers.items():
            worst = max(worst, _close(v, want_layers[layer]))
        for layer, v in zip(got["names"], max_abs):
            worst = max(worst, _close(v, want_max[layer]))
    # Every rank clipped by the same factor: the unsharded gradient is the clipped reference.
    for n, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][n], g, rtol=REL, atol=1e-7, msg=n)
    for n, p in ref["params"].items():
        torch.testing.assert_close(got["params"][n], p, rtol=REL, atol=1e-7, msg=n)
    return worst


def stored_as_reference(server, job: str, ranks: int, ref: dict) -> None:
    """Asserts that the service took in every summary of `job` and shows the
    reference's last norm."""
    stored = server.wait_for_step(job, STEPS + 1)
    deadline = time.monotonic() + 30
    while stored.connected_streams:  # every summary taken in: the gauge holds a last step's norm
        assert time.monotonic() < deadline, stored
        time.sleep(0.05)
        stored = server.job(job)
    assert stored.ranks == ranks and stored.layers == len(ref["layers"][0])
    _close(_metric(server, job), ref["norms"][-1])


@pytest.mark.parametrize(
    ("kind", "world"),
    [(kind, world) for world, kinds in WORLDS.items() for kind in kinds],
)
def test_a_sharded_model_reports_and_clips_by_the_whole_models_norms(runs, kind, world):
    ranks = runs.ranks(kind, world)
    server, job = runs.server, f"sharded-{kind}"
    ref = reference()
    worst = 0.0
    for got in ranks:
        assert got["sharded"] == (kind != "ddp"), "DDP keeps the fast path: its gradients are the model's already"
        assert sorted(got["names"]) == sorted(ref["layers"][0]), got["names"]
        assert got["clipped"] == STEPS
        assert not got["poisoned"] and got["skipped"] == 1
        nan_norm, _, _, nonfinite = got["measured"][0]
        assert math.isnan(nan_norm) and sum(nonfinite) == 1, nonfinite
        assert len(got["measured"]) == STEPS + 1
        worst = max(worst, matches_reference(got, ref))
    print(f"{kind}: worst relative error {worst:.1e}")
    stored_as_reference(server, job, world, ref)


@pytest.mark.parametrize(
    ("kind", "world"),
    [(kind, world) for world, kinds in WORLDS.items() for kind in kinds],
)
def test_an_in_memory_snapshot_restores_every_ranks_shard(runs, kind, world):
    for r in runs.ranks(kind, world):
        kept, moved, restored = r["snapshot"]
        assert any(not torch.equal(moved[n], kept[n]) for n in kept), "the extra step moved the weights"
        for n in kept:
            assert torch.equal(restored[n], kept[n]), n
