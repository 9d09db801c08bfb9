"""PyTorch Lightning adapter: `trainer = Trainer(callbacks=[GradGuardCallback(job="run-7")])`.

Lightning unscales AMP gradients before `on_before_optimizer_step`, where the
guard measures, sends and applies advice (a skipped step leaves the
parameters untouched). Halt advice stops the trainer gracefully
(`trainer.should_stop`); rollback advice calls `on_rollback` if given, else
`gradguard.RollbackRequested` propagates out of `trainer.fit` so the job can
resume from a checkpoint.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("gradguard.lightning needs lightning: pip install 'gradguard[lightning]'") from e

from ._guard import Guard, TrainingHalted


class GradGuardCallback(Callback):
    """Guards the first optimizer of a LightningModule; options as `gradguard.watch`."""

    def __init__(self, job: str, server: str | None = None, mode: str = "enforce", **options: Any):
        self.job, self.server, self.mode, self.options = job, server, mode, options
        self.guard: Guard | None = None
        self.halted: TrainingHalted | None = None
        self._loss = None

    def on_fit_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        plugin = getattr(trainer, "precision_plugin", None)
        options = dict(self.options)
        options.setdefault("rank", trainer.global_rank)
        options.setdefault("world_size", trainer.world_size)
        self.guard = Guard(
            pl_module,
            optimizer,
            job=self.job,
            server=self.server,
            mode=self.mode,
            scaler=getattr(plugin, "scaler", None),
            **options,
        )

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.guard is None or self.halted is not None:
            return
        try:
            self.guard.step(self._loss)
        except TrainingHalted as e:
            self.halted = e
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()

    def state_dict(self) -> dict:
        return self.guard.state_dict() if self.guard is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.guard is not None and state_dict:
            self.guard.load_state_dict(state_dict)
