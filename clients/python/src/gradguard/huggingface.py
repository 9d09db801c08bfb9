"""Hugging Face Trainer adapter: `Trainer(..., callbacks=[GradGuardTrainerCallback(job="run-7", max_norm=1.0)])`.

The guard measures in `on_pre_optimizer_step`. The Trainer clips gradients
*before* that event, so give the clip norm to the guard and turn the
Trainer's off (`TrainingArguments(max_grad_norm=0)`): the guard then measures
the gradients as they came out of backward, clips at `max_norm` itself (or at
the advised norm), and the service sees the real norm. The loss is taken from
the model's output (`output.loss`). Halt advice stops training
(`control.should_training_stop`); rollback advice calls `on_rollback` if
given, else `gradguard.RollbackRequested` propagates out of `trainer.train`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as e:
    raise ImportError("gradguard.huggingface needs transformers: pip install 'gradguard[huggingface]'") from e

from ._config import Mode, check_options, options_of
from ._guard import Guard, TrainingHalted

if TYPE_CHECKING:
    import torch
    from torch.utils.hooks import RemovableHandle

log = logging.getLogger("gradguard")

# Set by the callback itself, not options.
_OWN = ("job", "server", "mode")


class GradGuardTrainerCallback(TrainerCallback):
    """Options as `gradguard.watch`."""

    def __init__(self, job: str | None = None, server: str | None = None, mode: Mode | None = None, **options: Any):
        # A mistyped option fails here, not when training starts.
        check_options(options, [o for o in options_of(Guard.__init__) if o not in _OWN], "GradGuardTrainerCallback")
        self.job, self.server, self.mode, self.options = job, server, mode, options
        self.guard: Guard | None = None
        self.halted: TrainingHalted | None = None
        self._loss: torch.Tensor | None = None
        self._hook: RemovableHandle | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: object = None,
        **kwargs: Any,
    ) -> None:
        if model is None or optimizer is None:
            raise ValueError("GradGuardTrainerCallback needs the Trainer's model and optimizer")
        if args.max_grad_norm:
            log.warning(
                "gradguard: TrainingArguments.max_grad_norm=%s clips before gradguard measures; "
                "set max_grad_norm=0 and pass max_norm=%s to GradGuardTrainerCallback instead",
                args.max_grad_norm,
                args.max_grad_norm,
            )
        # Accelerate wraps the optimizer; the step hooks belong on the real one.
        inner = getattr(optimizer, "optimizer", optimizer)
        options = dict(self.options)
        options.setdefault("rank", args.process_index)
        options.setdefault("world_size", args.world_size)
        self.guard = Guard(model, inner, job=self.job, server=self.server, mode=self.mode, **options)
        self._hook = model.register_forward_hook(self._capture_loss)

    def _capture_loss(self, module: torch.nn.Module, inputs: object, output: object) -> None:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is not None:
            self._loss = loss.detach()

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.guard is None or self.halted is not None:
            return
        try:
            self.guard.step(self._loss)
        except TrainingHalted as e:
            self.halted = e
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.guard is not None:
            self.guard.close()
