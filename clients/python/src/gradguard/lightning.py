"""PyTorch Lightning adapter: `trainer = Trainer(callbacks=[GradGuardCallback(job="run-7")])`.

Lightning unscales AMP gradients before `on_before_optimizer_step`, where the
guard measures, sends and applies advice (a skipped step leaves the
parameters untouched). Halt advice stops the trainer gracefully
(`trainer.should_stop`); rollback advice restores an in-memory snapshot
(`snapshot_every=N`), else calls `on_rollback` if given, else with
`on_rollback="raise"` `gradguard.RollbackRequested` propagates out of
`trainer.fit` so the job can resume from a checkpoint; else the step is
skipped and the learning rate halved (see `gradguard.watch`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from lightning.pytorch import Callback, LightningModule, Trainer
else:
    try:
        from lightning.pytorch import Callback
    except ImportError:  # the standalone package
        try:
            from pytorch_lightning import Callback
        except ImportError as e:
            raise ImportError("gradguard.lightning needs lightning: pip install 'gradguard[lightning]'") from e

from ._config import Mode, check_options, options_of
from ._guard import Guard, TrainingHalted

# Set by the callback itself, not options.
_OWN = ("job", "server", "mode", "scaler")


class GradGuardCallback(Callback):
    """Guards the first optimizer of a LightningModule; options as `gradguard.watch`."""

    def __init__(self, job: str | None = None, server: str | None = None, mode: Mode | None = None, **options: Any):
        # A mistyped option fails here, not when training starts.
        check_options(options, [o for o in options_of(Guard.__init__) if o not in _OWN], "GradGuardCallback")
        self.job, self.server, self.mode, self.options = job, server, mode, options
        self.guard: Guard | None = None
        self.halted: TrainingHalted | None = None
        self._loss: torch.Tensor | None = None
        # State restored before the guard exists: `fit(ckpt_path=...)`
        # restores callbacks before `on_fit_start`.
        self._restored: Mapping[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
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
        if self._restored:
            self.guard.load_state_dict(self._restored)
            self._restored = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.guard is None or self.halted is not None:
            return
        try:
            self.guard.step(self._loss)
        except TrainingHalted as e:
            self.halted = e
            trainer.should_stop = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()

    def state_dict(self) -> dict[str, Any]:
        if self.guard is not None:
            return self.guard.state_dict()
        return dict(self._restored or {})

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores the advised clip, LR scale and step counter; kept until the
        guard exists when it arrives first (resuming with `ckpt_path`)."""
        if not state_dict:
            return
        if self.guard is not None:
            self.guard.load_state_dict(state_dict)
        else:
            self._restored = dict(state_dict)
