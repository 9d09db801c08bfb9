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
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._guard import Guard

__all__ = ["GradGuardError", "Guard", "RollbackRequested", "TrainingHalted", "__version__", "watch"]


def watch(
    model: Any,
    optimizer: Any,
    *,
    job: str,
    server: str | None = None,
    mode: str = "enforce",
    scaler: Any = None,
    scheduler: Any = None,
    token: str | None = None,
    tls_ca: str | os.PathLike | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
    **options: Any,
) -> Guard:
    """Starts guarding a training job; returns the `Guard` whose `step(loss)`
    goes between `loss.backward()` and `optimizer.step()`.

    - `job`: the job id every rank of the run shares.
    - `server`: `host:port` of `gradguard serve` (default `$GRADGUARD_SERVER`
      or `localhost:50051`); `https://host:port` connects with TLS. A server
      that is down never raises here or in `step`: summaries are buffered
      (bounded) and the stream resumes.
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
    - `mode`: `"enforce"` applies advice (clip, scale the LR, skip, set the
      loss scale, roll back, halt); `"observe"` only reports and logs.
    - `scaler`: the `torch.amp.GradScaler`, if any: gradients are measured
      after unscaling, and loss-scale advice applies to it.
    - `scheduler`: the LR scheduler, if any (checked to drive `optimizer`);
      the advised LR scale applies on top of whatever it sets.

    Further options (see `Guard`): `max_norm` (a standing clip norm: the guard
    then replaces `clip_grad_norm_`, reusing the norm it measured),
    `rank`/`world_size` (default from torch.distributed or `RANK`/`WORLD_SIZE`),
    `rule_profile`, `on_rollback(to_step, advice)` (else `RollbackRequested` is
    raised), `on_advice(advice, applied)`, `kafka_brokers` (send through Kafka
    instead of gRPC; needs `gradguard[kafka]`), `buffer` (summaries kept while
    the service is unreachable, default 4096), `max_lag` (steps the loop may
    run ahead of the service's decisions; default None, never wait; 0 is
    lock-step), `lag_timeout` (seconds it waits at most, default 10) and
    `linger` (seconds a summary may wait for the next ones to go with it in
    one message, default 0.25; a step that looks anomalous goes at once with
    those queued, and 0 sends every step on its own).
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
        **options,
    )


def __getattr__(name: str) -> Any:
    # The torch-dependent names load on first use, so `import gradguard` is cheap.
    if name in ("Guard", "GradGuardError", "RollbackRequested", "TrainingHalted"):
        from . import _guard

        return getattr(_guard, name)
    raise AttributeError(f"module 'gradguard' has no attribute {name!r}")
