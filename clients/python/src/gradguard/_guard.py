"""`Guard`: measures every optimizer step, streams it, and applies advice."""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from . import __version__
from ._config import Mode, named_options, resolve_job, resolve_mode
from ._layout import Layout, resolve_layout
from ._measure import Layers, Measurement
from ._security import resolve
from ._snapshot import Snapshots, default_snapshot_memory
from ._transport import Connection, GrpcConnection, KafkaConnection, Outbox, Progress, TransportStats
from ._urgency import Urgency
from .v1 import gradguard_pb2 as pb

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger("gradguard")

BATCH_BYTES = 1 << 20
# A rollback that cannot be done cuts the learning rate by this much instead.
FALLBACK_LR_FACTOR = 0.5
STATE_VERSION = 1


class GradGuardError(RuntimeError):
    """Base of the exceptions `Guard.step` raises at a step boundary."""


class RollbackRequested(GradGuardError):
    """The service advised rolling back to `to_step`, no snapshot could serve
    and `on_rollback="raise"` was given. Raised from `Guard.step` before the
    optimizer step, with the gradients cleared: restore a checkpoint from at
    or before `to_step` (and `guard.load_state_dict` with it), then carry on."""

    def __init__(self, to_step: int, advice: pb.Advice):
        super().__init__(f"gradguard advises rolling back to step {to_step}: {advice.reason}")
        self.to_step = to_step
        self.advice = advice


class TrainingHalted(GradGuardError):
    """The service advised halting the job (the last rung of its escalation).
    Raised from `Guard.step` before the optimizer step, gradients cleared."""

    def __init__(self, advice: pb.Advice):
        super().__init__(f"gradguard advises halting the job: {advice.reason}")
        self.advice = advice


@dataclass
class Stats:
    """Counters of a guard, for logs and tests."""

    steps: int
    skipped: int
    clipped: int
    sent: int
    messages: int  # that carried the summaries sent (several linger into one)
    urgent: int  # summaries sent at once, without lingering
    dropped: int
    connects: int
    connected: bool
    advice_received: int
    advice_applied: int
    clip_norm: float | None
    lr_scale: float
    last_error: str
    lag_timeouts: int
    refused: bool  # the service refused the credentials (UNAUTHENTICATED, PERMISSION_DENIED): no more retries
    snapshots: int  # in-memory snapshots held now
    restored: int  # rollbacks done from an in-memory snapshot
    fallbacks: int  # rollbacks that could not be done: the step was skipped and the learning rate cut


class Guard:
    """See `gradguard.watch`."""

    @named_options
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        job: str | None = None,
        server: str | None = None,
        mode: Mode | None = None,
        scaler: Any = None,
        scheduler: Any = None,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        max_norm: float | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        layout: Layout | DeviceMesh | None = None,
        rule_profile: str = "",
        on_rollback: Callable[[int, pb.Advice], object] | Literal["raise"] | None = None,
        on_advice: Callable[[pb.Advice, bool], object] | None = None,
        snapshot_every: int | None = None,
        snapshot_keep: int = 2,
        snapshot_memory: int | None = None,
        kafka_brokers: str | None = None,
        kafka_topics: tuple[str, str] = ("gradguard.summaries", "gradguard.advice"),
        kafka_properties: Mapping[str, Any] | None = None,
        buffer: int = 4096,
        max_abs: bool | None = None,
        process_group: Any = None,
        max_lag: int | None = None,
        lag_timeout: float = 10.0,
        linger: float = 0.25,
    ):
        mode = resolve_mode(mode)
        if max_norm is not None and not (
            isinstance(max_norm, (int, float)) and max_norm > 0 and math.isfinite(max_norm)
        ):
            raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
        if scheduler is not None and getattr(scheduler, "optimizer", optimizer) is not optimizer:
            raise ValueError("scheduler drives a different optimizer than the one given")
        if server is not None and kafka_brokers is not None:
            raise ValueError("give server (gRPC) or kafka_brokers, not both")
        if max_lag is not None and not (isinstance(max_lag, int) and max_lag >= 0):
            raise ValueError(f"max_lag must be a whole number of steps >= 0, got {max_lag!r}")
        if max_lag is not None and kafka_brokers is not None:
            raise ValueError("max_lag needs the gRPC transport (server=); the Kafka transport does not report progress")
        if not (isinstance(lag_timeout, (int, float)) and lag_timeout >= 0):
            raise ValueError(f"lag_timeout must be seconds >= 0, got {lag_timeout!r}")
        if not (isinstance(linger, (int, float)) and 0 <= linger < math.inf):
            raise ValueError(f"linger must be seconds >= 0, got {linger!r}")
        if not (isinstance(buffer, int) and buffer >= 1):
            raise ValueError(f"buffer must be at least 1, got {buffer!r}")
        if not (on_rollback is None or on_rollback == "raise" or callable(on_rollback)):
            raise ValueError(f'on_rollback must be a callable or "raise", got {on_rollback!r}')
        if snapshot_every is not None and not (isinstance(snapshot_every, int) and snapshot_every >= 1):
            raise ValueError(f"snapshot_every must be a whole number of steps >= 1, got {snapshot_every!r}")
        if not (isinstance(snapshot_keep, int) and snapshot_keep >= 1):
            raise ValueError(f"snapshot_keep must be at least 1, got {snapshot_keep!r}")
        if snapshot_memory is not None and not (isinstance(snapshot_memory, int) and snapshot_memory > 0):
            raise ValueError(f"snapshot_memory must be a number of bytes > 0, got {snapshot_memory!r}")
        if kafka_brokers is not None:
            security = {"token": token, "tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
            given = [k for k, v in security.items() if v is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: for the gRPC transport; Kafka takes SSL/SASL settings in kafka_properties"
                )
        # Off needs no job name (nor server, token or files): it guards nothing.
        self.job = resolve_job(job, required=mode != "off")
        self.mode: Mode = mode
        self.optimizer = optimizer
        self.scaler = scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None
        self.scheduler = scheduler
        self.max_norm = float(max_norm) if max_norm is not None else None
        self.max_abs = max_abs
        self.on_rollback = on_rollback
        self.on_advice = on_advice
        self.max_lag = max_lag
        self.lag_timeout = float(lag_timeout)
        self._lag_timeouts = 0
        self.layers = Layers(model, optimizer)

        dist = torch.distributed if torch.distributed.is_available() else None
        self._group = process_group
        self._dist = dist if dist is not None and dist.is_initialized() else None
        if rank is None:
            rank = self._dist.get_rank(process_group) if self._dist else int(os.environ.get("RANK", "0"))
        if world_size is None:
            world_size = (
                self._dist.get_world_size(process_group) if self._dist else int(os.environ.get("WORLD_SIZE", "1"))
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        # Absent: the service compares every rank with every other, right for
        # DDP and for the sharded norms (every rank reports the whole model's).
        self.layout = resolve_layout(layout, world_size)

        # What advice did to this run; saved in checkpoints.
        self._step = 0
        self._skipped = 0
        self._clipped = 0
        self._advised_clip: float | None = None
        self._lr_scale = 1.0
        self._applied = 0

        # Advice from the connection thread: job-wide advice waits until every
        # rank has it (see _agree), advice for this rank alone does not.
        self._lock = threading.Lock()
        self._inbox: collections.deque[pb.Advice] = collections.deque()
        self._received_max = 0  # highest job-wide advice id received
        self._pending_rollback: pb.Advice | None = None

        self._lr_saved: list[float] | None = None
        self._last_grad_norm: float | None = None
        self._stats = TransportStats()
        self._closed = False
        self._hooks: list[Any] = []
        self._conn: Connection | None = None
        self._snapshots: Snapshots | None = None
        self._restored = 0
        self._fallbacks = 0
        if mode == "off":
            log.info("gradguard: mode off; not guarding %s", f"job {self.job}" if self.job else "this run")
            return

        if kafka_brokers is None:
            # Files and the token are read now: a bad one raises here, not in the background.
            endpoint = resolve(server, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        # DeepSpeed's ZeRO optimizer is no torch optimizer: it steps the one it wraps.
        hooked: Any = (
            optimizer if hasattr(optimizer, "register_step_pre_hook") else getattr(optimizer, "optimizer", None)
        )
        if not hasattr(hooked, "register_step_pre_hook"):
            raise TypeError(
                f"optimizer: a torch.optim.Optimizer (or a wrapper of one in .optimizer), got {optimizer!r}"
            )
        if snapshot_every is not None and mode == "enforce":
            if hooked is not optimizer:
                raise ValueError(
                    "snapshot_every: in-memory snapshots do not cover DeepSpeed's ZeRO optimizer; "
                    "give on_rollback a function that loads your checkpoint (engine.load_checkpoint)"
                )
            self._snapshots = Snapshots(
                model,
                optimizer,
                scaler=self.scaler,
                scheduler=scheduler,
                every=snapshot_every,
                keep=snapshot_keep,
                memory=snapshot_memory if snapshot_memory is not None else default_snapshot_memory(),
            )
        self._hooks = [
            hooked.register_step_pre_hook(self._before_optimizer_step),
            hooked.register_step_post_hook(self._after_optimizer_step),
        ]
        # A batch stays well under the 4 MiB a gRPC message may have: a
        # summary is at most ~13 bytes per layer (three packed arrays).
        max_batch = max(1, min(64, BATCH_BYTES // (20 * len(self.layers.names) + 64)))
        self._outbox = Outbox(buffer, self._stats, linger=float(linger), max_batch=max_batch)
        self._urgency = Urgency()
        hello = pb.Hello(
            job=self.job,
            rank=rank,
            world_size=world_size,
            layer_names=self.layers.names,
            client_version=f"gradguard-python/{__version__}",
            rule_profile=rule_profile,
            report_progress=max_lag is not None,
            layout=self.layout.to_proto() if self.layout is not None else None,
        )
        self._progress = Progress()
        if kafka_brokers is not None:
            self._conn = KafkaConnection(
                kafka_brokers,
                kafka_topics,
                kafka_properties or {},
                hello=hello,
                outbox=self._outbox,
                stats=self._stats,
                on_advice=self._receive,
                progress=self._progress,
            )
        else:
            self._conn = GrpcConnection(
                endpoint,
                hello=hello,
                outbox=self._outbox,
                stats=self._stats,
                on_advice=self._receive,
                on_welcome=self._welcome,
                progress=self._progress,
            )
        self._conn.start()

    # ----------------------------------------------------------------- API

    def step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Call once per optimizer step, after `backward()` (and for AMP
        without a `scaler` given, after `scaler.unscale_`), before
        `optimizer.step()`. Measures, sends, and in enforce mode applies the
        advice received so far. Returns False when this step must be skipped;
        the gradients are then cleared, so `optimizer.step()` changes nothing.
        Raises `RollbackRequested` or `TrainingHalted` when so advised. The
        global gradient norm it measured is then `last_grad_norm`. In mode
        "off" it returns True at once."""
        if self._closed:
            raise RuntimeError("this guard is closed")
        if self.mode == "off":
            return True
        if self._snapshots is not None and not self._snapshots.slots and self._snapshots.due(self._step):
            self._snapshots.take(self._step)  # the state before the first step this guard sees
        with self._lock:  # the connection thread may move it (see _welcome)
            self._step += 1
            step = self._step
        if self.scaler is not None:
            _unscale_once(self.scaler, self.optimizer)
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        if self.layers.sharding is not None:
            # Sharded gradients: the model's norms from a reduction across the
            # sharding group; the advice agreement rides in it (see _sharded.py).
            local = None
            if self._dist is not None and self.world_size > 1:
                with self._lock:
                    local = self._received_max
            m = self.layers.measure_sharded(
                loss, loss_scale=scale, agree=local, agree_group=self._group, max_abs=self.max_abs
            )
        else:
            agree = self._agreement()
            m = self.layers.measure(loss, loss_scale=scale, agree=agree, max_abs=self.max_abs)
        self._last_grad_norm = m.grad_norm
        self._send(step, m)
        if self.max_lag is not None:
            self._keep_up(step, self.max_lag)

        advice = self._due(m.agreed)
        if self._snapshots is not None and any(a.severity >= pb.SEVERITY_WARNING for a in advice):
            self._snapshots.alarmed(step)
        if self.mode == "observe":
            for a in advice:
                self._ack(a, step, False, "observe mode")
            return True
        return self._enforce(step, m, advice)

    def close(self, flush_timeout: float = 5.0) -> None:
        """Sends what is buffered (at most `flush_timeout` seconds) and ends
        the stream. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for hook in self._hooks:
            hook.remove()
        if self._snapshots is not None:
            self._snapshots.close()
            self._snapshots = None
        if self._conn is not None:
            self._conn.stop(flush_timeout)

    def __enter__(self) -> Guard:  # noqa: PYI034 -- typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_grad_norm(self) -> float | None:
        """The global L2 norm of the gradients measured by the last `step()`
        (after AMP unscaling, before any clipping: what `clip_grad_norm_`
        returns), for logging; `inf` or `nan` on a step with non-finite
        gradients; None before the first step and in mode "off"."""
        return self._last_grad_norm

    @property
    def stats(self) -> Stats:
        s = self._stats
        return Stats(
            steps=self._step,
            skipped=self._skipped,
            clipped=self._clipped,
            sent=s.sent,
            messages=s.messages,
            urgent=s.urgent,
            dropped=s.dropped,
            connects=s.connects,
            connected=s.connected,
            advice_received=s.advice,
            advice_applied=self._applied,
            clip_norm=self._clip_norm(),
            lr_scale=self._lr_scale,
            last_error=s.last_error,
            lag_timeouts=self._lag_timeouts,
            refused=s.refused,
            snapshots=len(self._snapshots.slots) if self._snapshots is not None else 0,
            restored=self._restored,
            fallbacks=self._fallbacks,
        )

    def state_dict(self) -> dict[str, Any]:
        """What advice changed in this run (step counter, LR scale, advised
        clip norm), to save beside the model and optimizer."""
        return {
            "version": STATE_VERSION,
            "job": self.job,
            "step": self._step,
            "lr_scale": self._lr_scale,
            "advised_clip": self._advised_clip,
            "skipped": self._skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores `state_dict()`. Restoring a checkpoint after
        `RollbackRequested` acknowledges that rollback as applied."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown gradguard state version {state.get('version')!r} (expected {STATE_VERSION})")
        self._lr_scale = float(state["lr_scale"])
        self._advised_clip = state["advised_clip"]
        self._skipped = int(state["skipped"])
        # Step numbers never go back on the wire: the service refuses steps it
        # has seen, and its rewind on the rollback ack makes room for new ones.
        self._step = max(self._step, int(state["step"]))
        if self._pending_rollback is not None:
            self._ack(self._pending_rollback, self._step, True, f"checkpoint restored at step {state['step']}")
            self._pending_rollback = None

    # ------------------------------------------------------------ sending

    def _send(self, step: int, m: Measurement) -> None:
        lr = self.optimizer.param_groups[0].get("lr")
        summary = pb.Summary(
            step=step,
            time=time.time(),
            layer_l2=m.layer_l2,
            layer_max_abs=m.layer_max_abs,
        )
        summary.grad_norm = m.grad_norm
        if m.loss is not None:
            summary.loss = m.loss
        if lr is not None:
            summary.lr = float(lr) * self._lr_scale
        if m.loss_scale is not None:
            summary.loss_scale = m.loss_scale
        if any(m.layer_nonfinite):
            summary.layer_nonfinite.extend(m.layer_nonfinite)
        self._outbox.put_summary(summary, urgent=self._urgency(m))

    def _keep_up(self, step: int, max_lag: int) -> None:
        """Waits until the service has decided on `step - max_lag`, so advice
        is in force at most `max_lag` steps after the step that caused it.
        Never waits on a service that is down or does not report progress."""
        if self._progress.wait(step - max_lag, 0):
            return
        self._outbox.flush()  # the step waited for may be lingering here
        if self._progress.wait(step - max_lag, self.lag_timeout):
            return
        self._lag_timeouts += 1
        if self._lag_timeouts == 1:
            log.warning(
                "gradguard: the service has not decided on step %d after %.1f s (max_lag %d); going on without it",
                step - max_lag,
                self.lag_timeout,
                max_lag,
            )

    def _ack(self, advice: pb.Advice, step: int, applied: bool, note: str) -> None:
        self._applied += applied
        self._outbox.put_ack(pb.AdviceAck(advice_id=advice.id, applied_step=step, applied=applied, note=note))
        if self.on_advice is not None:
            self.on_advice(advice, applied)

    # ----------------------------------------------------------- receiving

    def _receive(self, advice: pb.Advice) -> None:
        """On the connection thread."""
        targeted = advice.HasField("target_rank")
        if targeted and advice.target_rank != self.rank:
            return
        # Job-wide advice reaches every rank alike: rank 0 tells the user.
        log.log(
            logging.WARNING if targeted or self.rank == 0 else logging.DEBUG,
            "gradguard advice %d at step %d: %s (%s)",
            advice.id,
            advice.decided_at_step,
            advice.WhichOneof("action"),
            advice.reason,
        )
        with self._lock:
            self._inbox.append(advice)
            if not advice.HasField("target_rank"):
                self._received_max = max(self._received_max, advice.id)

    def _welcome(self, welcome: pb.Welcome) -> None:
        """On the connection thread: the job's urgency thresholds, as the
        service's rules have them; and a service that already holds later
        steps of this rank (a restarted worker) moves the step counter past
        them."""
        if welcome.HasField("urgency"):
            self._urgency.configure(welcome.urgency)
        if not welcome.HasField("last_step"):
            return
        with self._lock:
            behind = welcome.last_step > self._step
            if behind:
                self._step = welcome.last_step
        if behind:
            log.warning(
                "gradguard: the service already holds step %d of %s rank %d; continuing from step %d",
                welcome.last_step,
                self.job,
                self.rank,
                welcome.last_step + 1,
            )

    def _agreement(self) -> torch.Tensor | None:
        """With several ranks, the highest job-wide advice id that every rank
        has received: all ranks then apply the same advice at the same step."""
        if self._dist is None or self.world_size == 1:
            return None
        with self._lock:
            local = self._received_max
        return self._min_over_ranks(local)

    def _min_over_ranks(self, value: int) -> torch.Tensor:
        """The smallest of every rank's `value`, on the device the group's
        backend reduces on (no host sync here)."""
        assert self._dist is not None
        backend = self._dist.get_backend(self._group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.int64, device=device)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN, group=self._group)
        return t

    def _due(self, agreed: int | None) -> list[pb.Advice]:
        """The advice to act on now, in the order it was decided."""
        with self._lock:
            if agreed is None:
                due = list(self._inbox)
                self._inbox.clear()
                return due
            due = [a for a in self._inbox if a.HasField("target_rank") or a.id <= agreed]
            for a in due:
                self._inbox.remove(a)
            return due

    # ------------------------------------------------------------ applying

    def _enforce(self, step: int, m: Measurement, advice: list[pb.Advice]) -> bool:
        skip: pb.Advice | None = None
        halt: pb.Advice | None = None
        rollback: pb.Advice | None = None
        for a in advice:
            action = a.WhichOneof("action")
            if action == "clip_gradients":
                norm = a.clip_gradients.max_norm
                if norm > 0 and math.isfinite(norm):
                    self._advised_clip = norm
                    self._ack(a, step, True, f"clipping at {norm:.4g}")
                else:
                    self._ack(a, step, False, f"refused: max_norm {norm!r}")
            elif action == "scale_lr":
                f = a.scale_lr.factor
                if f > 0 and math.isfinite(f):
                    self._lr_scale *= f
                    self._ack(a, step, True, f"learning rate scale now {self._lr_scale:.4g}")
                else:
                    self._ack(a, step, False, f"refused: factor {f!r}")
            elif action == "skip_step":
                if a.apply_from_step >= step:
                    skip = a
                else:
                    self._ack(a, step, False, f"arrived after step {a.apply_from_step} was taken")
            elif action == "scale_loss_scale":
                self._scale_loss_scale(a, step)
            elif action == "rollback":
                rollback = a
            elif action == "halt":
                halt = a
            else:  # inspect_worker and actions newer than this client
                self._ack(a, step, False, f"{action}: for the operator; logged")

        if halt is not None:
            self._skipped += 1
            self.layers.clear_grads()
            self._ack(halt, step, True, "TrainingHalted raised")
            raise TrainingHalted(halt)
        if rollback is not None:
            self._skipped += 1
            self.layers.clear_grads()
            self._roll_back(step, rollback)
            return False

        if skip is not None or not m.finite:
            self._skipped += 1
            self.layers.clear_grads()
            if skip is not None:
                self._ack(skip, step, True, "step skipped")
            return False

        limit = self._clip_norm()
        if limit is not None and m.grad_norm > limit:
            self._clipped += 1
            self.layers.scale_grads(limit / (m.grad_norm + 1e-6))
        return True

    def _roll_back(self, step: int, advice: pb.Advice) -> None:
        """In order: the newest in-memory snapshot at or before the step
        advised, the user's `on_rollback`, the exception if asked for, else
        what can be done here: skip the step and cut the learning rate."""
        to_step = advice.rollback.to_step
        restored = self._restore_snapshot(to_step, job_wide=not advice.HasField("target_rank"))
        if restored is not None:
            self._restored += 1
            self._ack(advice, step, True, f"restored the in-memory snapshot of step {restored}")
            return
        if callable(self.on_rollback):
            self.on_rollback(to_step, advice)
            self._ack(advice, step, True, "on_rollback called")
            return
        if self.on_rollback == "raise":
            self._pending_rollback = advice
            raise RollbackRequested(to_step, advice)
        self._fallbacks += 1
        self._lr_scale *= FALLBACK_LR_FACTOR
        if self._snapshots is None:
            missing = "no in-memory snapshots (snapshot_every) and no on_rollback"
        elif self._snapshots.disabled:
            missing = f"no in-memory snapshots ({self._snapshots.disabled})"
        else:
            oldest = self._snapshots.oldest()
            missing = f"no in-memory snapshot at or before step {to_step} (the oldest held is of step {oldest})"
        note = f"{missing}: skipped the step and cut the learning rate (scale now {self._lr_scale:.4g})"
        self._ack(advice, step, False, note)
        if self._fallbacks == 1:
            log.log(
                logging.WARNING if self.rank == 0 else logging.DEBUG,
                "gradguard: could not roll back to step %d as advised: %s. Give watch() snapshot_every=N to "
                "roll back in memory, or on_rollback to restore your checkpoints "
                '(on_rollback="raise" raises RollbackRequested instead); said once',
                to_step,
                note,
            )

    def _restore_snapshot(self, to_step: int, *, job_wide: bool) -> int | None:
        """Restores the newest snapshot at or before `to_step` that every
        rank holds (they take them at the same steps; one may hold fewer)."""
        if self._snapshots is None:
            return None
        local = self._snapshots.newest_at_or_before(to_step)
        chosen = -1 if local is None else local
        if job_wide and self._dist is not None and self.world_size > 1:
            chosen = int(self._min_over_ranks(chosen).item())
        if chosen < 0 or self._snapshots.newest_at_or_before(chosen) != chosen:
            return None
        try:
            self._snapshots.restore(chosen)
        except RuntimeError as e:
            log.error("gradguard: restoring the in-memory snapshot of step %d failed: %s", chosen, e)
            return None
        return chosen

    def _clip_norm(self) -> float | None:
        limits = [x for x in (self.max_norm, self._advised_clip) if x is not None]
        return min(limits) if limits else None

    def _scale_loss_scale(self, a: pb.Advice, step: int) -> None:
        f = a.scale_loss_scale.factor
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        if scale is None:
            self._ack(a, step, False, "no GradScaler given to gradguard.watch")
        elif not (f > 0 and math.isfinite(f)):
            self._ack(a, step, False, f"refused: factor {f!r}")
        else:
            scale.mul_(f).clamp_(min=1.0)  # takes effect from the next backward
            self._ack(a, step, True, f"loss scale multiplied by {f:.4g}")

    # The LR scale rides on top of whatever the scheduler set: applied just
    # before the optimizer's step and taken off right after, so a scheduler
    # stepping later still sees (and sets) its own values.
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if self._snapshots is not None:
            self._snapshots.before_optimizer_step()
        sharding = self.layers.sharding
        if sharding is not None and sharding.skipping:  # a skipped step under DeepSpeed ZeRO
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        if self._lr_scale == 1.0 or self.mode != "enforce":
            return
        self._lr_saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * self._lr_scale

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if self._lr_saved is not None:
            for g, lr in zip(optimizer.param_groups, self._lr_saved):
                g["lr"] = lr
            self._lr_saved = None
        if self._snapshots is not None and self._snapshots.due(self._step):
            self._snapshots.take(self._step)


def _unscale_once(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """`scaler.unscale_(optimizer)` unless the training loop already did."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        stage = states[id(optimizer)].get("stage")
        if stage is not None and getattr(stage, "name", "") == "UNSCALED":
            return
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as e:
        if "already been called" not in str(e):
            raise
