"""Hugging Face Trainer adapter: `Trainer(..., callbacks=[GradGuardTrainerCallback(job="run-7", max_norm=1.0)])`.

The guard measures in `on_pre_optimizer_step`. The Trainer clips gradients
*before* that event, so the callback takes its clipping over: with
`TrainingArguments.max_grad_norm` set (1.0 by default) and no `max_norm`
given to the callback, the guard clips at that norm itself and the Trainer's
is turned off (said once in the log). The guard then measures the gradients
as they came out of backward, clips at `max_norm` (or at the advised norm),
and the service sees the real norm.

The guard's state (advised clip, LR scale, step counter) is saved with the
Trainer's checkpoints (`ExportableState`, in `trainer_state.json`) and in
force again after `trainer.train(resume_from_checkpoint=...)`. The loss is taken from
the model's output (`output.loss`). Halt advice stops training
(`control.should_training_stop`); rollback advice restores an in-memory
snapshot (`snapshot_every=N`), else calls `on_rollback` if given, else with
`on_rollback="raise"` `gradguard.RollbackRequested` propagates out of
`trainer.train`; else the step is skipped and the learning rate halved.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
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


class GradGuardTrainerCallback(TrainerCallback, ExportableState):
    """Options as `gradguard.watch`."""

    # A resumed Trainer makes a new callback from `state()["args"]` (JSON):
    # within the same process, it gets the original's options back here,
    # callables (`on_rollback`, `on_advice`) included.
    _made: ClassVar[dict[int, tuple[str | None, str | None, Mode | None, dict[str, Any]]]] = {}

    def __init__(
        self,
        job: str | None = None,
        server: str | None = None,
        mode: Mode | None = None,
        _origin: int | None = None,
        **options: Any,
    ):
        if _origin is not None and _origin in self._made:
            job, server, mode, options = self._made[_origin]
        # A mistyped option fails here, not when training starts.
        check_options(options, [o for o in options_of(Guard.__init__) if o not in _OWN], "GradGuardTrainerCallback")
        self.job, self.server, self.mode, self.options = job, server, mode, options
        self.guard: Guard | None = None
        self.halted: TrainingHalted | None = None
        self._loss: torch.Tensor | None = None
        self._hook: RemovableHandle | None = None
        # The guard's state from a checkpoint, applied when the guard starts.
        self._restored: Mapping[str, Any] | None = None
        self._origin = id(self) if _origin is None else _origin
        self._made[self._origin] = (job, server, mode, options)

    def state(self) -> dict[str, Any]:
        """What `trainer_state.json` keeps of the callback: its JSON-able
        options and the guard's state."""
        plain = {k: v for k, v in self.options.items() if isinstance(v, (str, int, float, bool, type(None)))}
        guard = self.guard.state_dict() if self.guard is not None else self._restored
        return {
            "args": {"job": self.job, "server": self.server, "mode": self.mode, "_origin": self._origin, **plain},
            "attributes": {"_restored": dict(guard) if guard else None},
        }

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
        options = dict(self.options)
        if args.max_grad_norm:
            if options.get("max_norm") is None:
                # The Trainer would clip before the guard measures: the guard
                # clips at the same norm instead, after measuring.
                options["max_norm"] = float(args.max_grad_norm)
                log.info(
                    "gradguard: clipping at TrainingArguments.max_grad_norm=%s in place of the Trainer, "
                    "so the service sees the gradients before clipping",
                    args.max_grad_norm,
                )
            else:
                log.info("gradguard: max_norm=%s replaces TrainingArguments.max_grad_norm", options["max_norm"])
            args.max_grad_norm = 0.0
        # Accelerate wraps the optimizer; the step hooks belong on the real one.
        inner = getattr(optimizer, "optimizer", optimizer)
        options.setdefault("rank", args.process_index)
        options.setdefault("world_size", args.world_size)
        self.guard = Guard(model, inner, job=self.job, server=self.server, mode=self.mode, **options)
        if not self._restored:
            # Resuming without `restore_callback_states_from_checkpoint` (the
            # default): the state is in the resumed TrainerState all the same.
            saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
            if isinstance(saved, list):
                saved = saved[0] if saved else None
            if isinstance(saved, dict):
                self._restored = (saved.get("attributes") or {}).get("_restored")
        if self._restored:
            self.guard.load_state_dict(self._restored)
            self._restored = None
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
