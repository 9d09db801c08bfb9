"""gradguard: stream gradient summaries of a PyTorch training job to the
gradguard service and apply the advice it sends back.

    guard = gradguard.watch(model, optimizer, job="gpt2-run-7", server="localhost:50051")
    ...
    loss.backward()
    if guard.step(loss):
        optimizer.step()

torch is imported only when `watch` is called; the Lightning and Hugging Face
adapters live in `gradguard.lightning` and `gradguard.huggingface`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from ._config import Mode, named_options
from ._layout import Layout

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    from ._guard import Guard
    from .v1 import gradguard_pb2 as pb

__all__ = [
    "GradGuardError",
    "Guard",
    "Layout",
    "Mode",
    "RollbackRequested",
    "TrainingHalted",
    "__version__",
    "watch",
]


@named_options
def watch(
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
) -> Guard:
    """Starts guarding a training job; returns the `Guard` whose `step(loss)`
    goes between `loss.backward()` and `optimizer.step()` (False: skip the
    optimizer step; `guard.last_grad_norm` is then the global gradient norm
    it measured, for logging). Every option is a
    keyword argument: a mistyped one raises TypeError naming it and listing
    the valid ones; a bad value raises ValueError naming the option (or the
    environment variable it came from).

    - `job`: the job id every rank of the run shares (default `$GRADGUARD_JOB`,
      else the launcher's run id: `$TORCHELASTIC_RUN_ID` under torchrun,
      unless it is "none", then `$SLURM_JOB_ID`; with none of them,
      ValueError).
    - `server`: `host:port` of `gradguard serve` (default `$GRADGUARD_SERVER`
      or `localhost:50051`); `https://host:port` connects with TLS. A server
      that is down never raises here or in `step`: summaries are buffered
      (bounded) and the stream resumes.
    - `mode` (default `$GRADGUARD_MODE`, else `"enforce"`): `"enforce"`
      applies advice (clip, scale the LR, skip, set the loss scale, roll back,
      halt); `"observe"` only reports and logs; `"off"` guards nothing: `step`
      returns True at once, with no connection, thread or optimizer hook, and
      nothing of `job`, `server`, the token or the TLS files is needed.
    - `token`: the bearer token the service's `--auth` file knows (default
      `$GRADGUARD_TOKEN`, else the contents of `$GRADGUARD_TOKEN_FILE`), sent
      as `authorization: Bearer` metadata; never logged.
    - `tls_ca`: a PEM bundle to verify the server with (default
      `$GRADGUARD_TLS_CA`, else the system roots); `tls_cert` and `tls_key`:
      this worker's PEM certificate and key for mutual TLS (default
      `$GRADGUARD_TLS_CLIENT_CERT`, `$GRADGUARD_TLS_CLIENT_KEY`). Any of
      them, given or from the environment, selects TLS for a bare
      `host:port` (and is an error with `http://`). A file that cannot be read
      raises ValueError here; a service that refuses the credentials
      (UNAUTHENTICATED, PERMISSION_DENIED) is logged once as an error and
      shows in `guard.stats.refused` and `last_error`, and the guard stops
      retrying.
    - `scaler`: the `torch.amp.GradScaler`, if any: gradients are measured
      after unscaling, and loss-scale advice applies to it.
    - `scheduler`: the LR scheduler, if any (checked to drive `optimizer`);
      the advised LR scale applies on top of whatever it sets.
    - `max_norm`: a standing clip norm: the guard then replaces
      `clip_grad_norm_`, reusing the norm it measured.
    - `rank`, `world_size`: default from torch.distributed, else `$RANK`,
      `$WORLD_SIZE`; `process_group`: the group to agree on advice in
      (default the world).
    - `layout`: how the job is laid out, so the service compares this rank's
      norm only with the ranks holding the same part of the model: a
      `gradguard.Layout(data_parallel, tensor_parallel, pipeline_parallel,
      replica_group)`, or the job's `DeviceMesh` with named dimensions ("pp",
      "tp", and data-parallel ones such as "dp", "dp_shard", "cp"), from which
      this rank's is derived. Its ranks must be `world_size` (ValueError
      otherwise). Give it with pipeline parallelism, where each stage reports
      its own layers' norms; left out (the default), every rank is compared
      with every other, which is right for DDP, FSDP, tensor parallelism and
      HSDP (the guard reports the whole model's norms on every rank).
    - `rule_profile`: a named profile of the service's rules file.
    - `snapshot_every`: keep in-memory snapshots of the training state (the
      model, the optimizer, the `scaler` and `scheduler` given), one before
      the first step and then every `snapshot_every` optimizer steps, the
      last `snapshot_keep` (2) of them, in at most `snapshot_memory` bytes of
      host memory (default a quarter of the host's, shared by
      `$LOCAL_WORLD_SIZE` ranks). Rollback advice then restores the newest
      snapshot at or before the step advised, by itself, and training goes on
      with the next batch (those since the snapshot are skipped). On a GPU
      the copy runs on a side stream, overlapping the next forward and
      backward. The service rolls back 100 steps before a problem began
      (`policy.rollback_steps`): snapshots every 100 steps or more keep one
      old enough.
    - `on_rollback(to_step, advice)`: restores a checkpoint when no snapshot
      can; `on_rollback="raise"` raises `RollbackRequested` instead. Without
      either, a rollback that cannot be done skips the step and halves the
      learning rate, and says so once. `on_advice(advice, applied)`: called
      for every advice acted on.
    - `kafka_brokers`: send through Kafka instead of gRPC (needs
      `gradguard[kafka]`), on `kafka_topics` (summaries, advice), with
      `kafka_properties` given to librdkafka as they are.
    - `buffer`: summaries kept while the service is unreachable (4096).
    - `max_abs`: also measure max |g| per layer (default: on accelerators).
    - `max_lag`: steps the loop may run ahead of the service's decisions
      (default None, never wait; 0 is lock-step); `lag_timeout`: seconds it
      waits at most (10).
    - `linger`: seconds a summary may wait for the next ones to go with it in
      one message (0.25); a step that looks anomalous goes at once with those
      queued, and 0 sends every step on its own.
    """
    from ._guard import Guard

    return Guard(
        model,
        optimizer,
        job=job,
        server=server,
        mode=mode,
        scaler=scaler,
        scheduler=scheduler,
        token=token,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_norm=max_norm,
        rank=rank,
        world_size=world_size,
        layout=layout,
        rule_profile=rule_profile,
        on_rollback=on_rollback,
        on_advice=on_advice,
        snapshot_every=snapshot_every,
        snapshot_keep=snapshot_keep,
        snapshot_memory=snapshot_memory,
        kafka_brokers=kafka_brokers,
        kafka_topics=kafka_topics,
        kafka_properties=kafka_properties,
        buffer=buffer,
        max_abs=max_abs,
        process_group=process_group,
        max_lag=max_lag,
        lag_timeout=lag_timeout,
        linger=linger,
    )


def __getattr__(name: str) -> Any:
    # The torch-dependent names load on first use, so `import gradguard` is cheap.
    if name in ("Guard", "GradGuardError", "RollbackRequested", "TrainingHalted"):
        from . import _guard

        return getattr(_guard, name)
    raise AttributeError(f"module 'gradguard' has no attribute {name!r}")
