"""In-memory snapshots of the training state, for rollback without user code.

Every `every` optimizer steps (and once before the first), the guard copies
what an optimizer step changes to host memory: the model's parameters and
buffers, the optimizer's state and hyperparameters, the GradScaler's scale
and the LR scheduler's state. Rollback advice restores the newest snapshot at
or before the step the service names, in place; the batches since are not
replayed (PaLM's skip), because the data loader goes on where it is.

Only quiet states are kept: a snapshot falls due every `every` steps but
waits until `every` steps have passed without advice of warning severity or
worse (the service worried about the run). The snapshot last restored stays
until the run has been quiet for `release` steps: a run that diverges again
from it is rolled back to it again.

Copies of CUDA tensors go to pinned host memory on a side stream, so the
copy overlaps the next step's forward and backward: the model's forward
waits (on the GPU, not the host) for its buffers to be copied, the next
optimizer step for the rest. Sharded models (FSDP1, FSDP2, DTensor) are
copied shard by shard: each rank keeps and restores its own shard, with no
collective and no gather. The snapshots kept are bounded by `memory` bytes.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("gradguard")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's data: a DTensor's local shard, a
    parameter's data without autograd."""
    local = getattr(t, "_local_tensor", None)  # DTensor, as FSDP2 and tensor parallelism make them
    if isinstance(local, torch.Tensor):
        return local
    return t.detach()


@dataclass
class _OptimizerEntry:
    """One parameter's optimizer state at snapshot time: tensors by host
    copy index, the rest (ints, floats) by value."""

    tensors: dict[str, int]
    values: dict[str, Any]


@dataclass
class _Snapshot:
    step: int = -1
    host: list[torch.Tensor] = field(default_factory=list)
    model: int = 0  # host[:model] are the model's buffers then parameters
    buffers: int = 0  # host[:buffers] are the model's buffers
    optimizer: dict[int, _OptimizerEntry] = field(default_factory=dict)  # by index in `params`
    groups: list[dict[str, Any]] = field(default_factory=list)
    scheduler: dict[str, Any] | None = None
    scaler: list[tuple[str, int]] = field(default_factory=list)  # attribute, host index
    buffers_done: Any = None  # torch.cuda.Event
    done: Any = None

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()


class Snapshots:
    """The last `keep` snapshots, taken every `every` steps, in at most
    `memory` bytes of host memory."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scaler: Any,
        scheduler: Any,
        every: int,
        keep: int,
        memory: int,
    ):
        self.model, self.optimizer, self.scaler, self.scheduler = model, optimizer, scaler, scheduler
        self.every, self.keep, self.memory = every, keep, memory
        self.slots: list[_Snapshot] = []  # oldest first
        self.next_step = 0
        self.alarm: int | None = None  # the latest step advice of warning severity or worse came in
        self.pinned: int | None = None  # the step of the snapshot last restored
        self.release = max(2 * every, 100)
        self.disabled = ""  # why snapshots stopped (too large for `memory`)
        self.bytes = 0  # of one snapshot, as last taken
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._stream: Any = None
        self._wait_buffers: Any = None  # event the next forward waits for
        self._wait_all: Any = None  # event the next optimizer step waits for
        self._hook = model.register_forward_pre_hook(self._before_forward)

    def close(self) -> None:
        self._hook.remove()

    # ------------------------------------------------------------ taking

    def due(self, step: int) -> bool:
        quiet = self.alarm is None or step - self.alarm >= self.every
        return not self.disabled and step >= self.next_step and quiet

    def alarmed(self, step: int) -> None:
        """Advice of warning severity or worse came in at `step`."""
        self.alarm = step

    def _model_tensors(self) -> Iterator[torch.Tensor]:
        """Buffers first (the forward writes them), then parameters."""
        yield from self.model.buffers()
        yield from self.model.parameters()

    def take(self, step: int) -> None:
        """Copies the state as it is now (after optimizer step `step`)."""
        if self.pinned is not None and (self.alarm is None or step - self.alarm >= self.release):
            self.pinned = None
        if self.pinned is not None and self.keep == 1:
            return  # the one slot holds the state to go back to if this course fails too
        self.next_step = step + self.every
        sources: list[torch.Tensor] = [_local(t) for t in self.model.buffers()]
        buffers = len(sources)
        sources += [_local(t) for t in self.model.parameters()]
        model = len(sources)
        optimizer: dict[int, _OptimizerEntry] = {}
        for p, state in self.optimizer.state.items():
            i = self._index.get(id(p))
            if i is None:
                continue
            entry = _OptimizerEntry({}, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    entry.tensors[k] = len(sources)
                    sources.append(_local(v))
                else:
                    entry.values[k] = copy.deepcopy(v)
            optimizer[i] = entry
        scaler: list[tuple[str, int]] = []
        for name in ("_scale", "_growth_tracker"):
            t = getattr(self.scaler, name, None) if self.scaler is not None else None
            if isinstance(t, torch.Tensor):
                scaler.append((name, len(sources)))
                sources.append(t)

        size = sum(t.numel() * t.element_size() for t in sources)
        self.bytes = size
        fits = self.memory // max(size, 1)
        if fits < 1:
            self.disabled = (
                f"a snapshot takes {size / 2**20:.1f} MiB, more than snapshot_memory ({self.memory / 2**20:.1f} MiB)"
            )
            log.warning("gradguard: no in-memory snapshots: %s", self.disabled)
            for s in self.slots:
                s.host.clear()
            self.slots.clear()
            return
        if fits < self.keep:
            log.warning(
                "gradguard: snapshot_memory holds %d snapshot(s) of %.1f MiB, not the %d asked for",
                fits,
                size / 2**20,
                self.keep,
            )
            self.keep = fits
            del self.slots[: max(0, len(self.slots) - fits)]

        if len(self.slots) >= self.keep:
            reuse = next(i for i, s in enumerate(self.slots) if s.step != self.pinned)
            slot = self.slots.pop(reuse)
        else:
            slot = _Snapshot()
        slot.wait()  # an old copy still in flight into these buffers
        slot.step, slot.model, slot.buffers, slot.optimizer, slot.scaler = step, model, buffers, optimizer, scaler
        slot.groups = [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        slot.scheduler = copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None
        slot.host = _fit(slot.host, sources)
        self._copy(slot, sources)
        self.slots.append(slot)

    def _copy(self, slot: _Snapshot, sources: list[torch.Tensor]) -> None:
        cuda = [t.device for t in sources if t.is_cuda]
        if not cuda:
            for host, t in zip(slot.host, sources):
                host.copy_(t)
            slot.buffers_done = slot.done = None
            return
        device = cuda[0]
        current = torch.cuda.current_stream(device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        stream = self._stream
        stream.wait_stream(current)  # the optimizer step's writes come first
        slot.buffers_done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        slot.done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        scaler = {i for _, i in slot.scaler}
        with torch.cuda.stream(stream):
            for i, (host, t) in enumerate(zip(slot.host, sources)):
                if i == slot.buffers:
                    slot.buffers_done.record(stream)
                if i not in scaler:
                    host.copy_(t, non_blocking=True)
            if slot.buffers == len(sources):
                slot.buffers_done.record(stream)
            slot.done.record(stream)
        # The scaler's scale changes in `scaler.update()` right after this
        # step, on the current stream: its copy is ordered before that there.
        for i in scaler:
            slot.host[i].copy_(sources[i], non_blocking=True)
        self._wait_buffers, self._wait_all = slot.buffers_done, slot.done

    def _before_forward(self, module: torch.nn.Module, args: object) -> None:
        if self._wait_buffers is not None:
            torch.cuda.current_stream().wait_event(self._wait_buffers)
            self._wait_buffers = None

    def before_optimizer_step(self) -> None:
        """The optimizer writes what a copy in flight reads: it waits (on the GPU)."""
        if self._wait_all is not None:
            torch.cuda.current_stream().wait_event(self._wait_all)
            self._wait_all = None

    # --------------------------------------------------------- restoring

    def newest_at_or_before(self, step: int) -> int | None:
        """The step of the newest snapshot at or before `step`."""
        steps = [s.step for s in self.slots if s.step <= step]
        return max(steps) if steps else None

    def oldest(self) -> int | None:
        return self.slots[0].step if self.slots else None

    def restore(self, step: int) -> None:
        """Puts the snapshot of `step` back in place."""
        slot = next(s for s in self.slots if s.step == step)
        slot.wait()
        self._wait_buffers = self._wait_all = None
        with torch.no_grad():
            for t, host in zip(self._model_tensors(), slot.host[: slot.model]):
                _local(t).copy_(host)
            state = self.optimizer.state
            for i, p in enumerate(self._params):
                entry = slot.optimizer.get(i)
                if entry is None:
                    state.pop(p, None)  # no state yet at the snapshot: a fresh start
                    continue
                now = state.get(p, {})
                restored: dict[str, Any] = dict(entry.values)
                for k, j in entry.tensors.items():
                    live = now.get(k)
                    host = slot.host[j]
                    if isinstance(live, torch.Tensor) and _local(live).shape == host.shape:
                        _local(live).copy_(host)
                        restored[k] = live
                    elif not hasattr(p, "_local_tensor"):
                        restored[k] = host.to(p.device, copy=True)
                    else:
                        raise RuntimeError(f"optimizer state {k!r} of a sharded parameter changed since the snapshot")
                state[p] = restored
            for g, saved in zip(self.optimizer.param_groups, slot.groups):
                g.update(copy.deepcopy(saved))
            for name, j in slot.scaler:
                getattr(self.scaler, name).copy_(slot.host[j])
        if self.scheduler is not None and slot.scheduler is not None:
            self.scheduler.load_state_dict(copy.deepcopy(slot.scheduler))
        # Snapshots after the one restored hold the abandoned run.
        self.slots = [s for s in self.slots if s.step <= step]
        self.next_step = step + self.every
        self.pinned = step


def _fit(host: list[torch.Tensor], sources: list[torch.Tensor]) -> list[torch.Tensor]:
    """Host buffers for `sources`, reusing those of the same shape and type
    (pinned memory is slow to allocate)."""
    out: list[torch.Tensor] = []
    for i, t in enumerate(sources):
        old = host[i] if i < len(host) else None
        if old is not None and old.shape == t.shape and old.dtype == t.dtype:
            out.append(old)
        else:
            pin = t.is_cuda
            out.append(torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin))
    return out


def default_snapshot_memory() -> int:
    """A quarter of the host's memory, shared by the ranks on it."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return total // 4 // local_ranks
