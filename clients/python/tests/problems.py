"""Small training problems the tests share."""

from __future__ import annotations

import copy
import math

import torch

STEPS = 400


class Regression:
    """A 3-layer tanh MLP on a smooth regression target, SGD with momentum and
    a linear LR warm-up. At peak LR 0.05 it trains; at 0.2 it crosses the edge
    of stability during the warm-up (around step 80) and blows up to NaN."""

    def __init__(self, peak_lr: float, seed: int = 0, warmup: int = 100):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(32, 128),
            torch.nn.Tanh(),
            torch.nn.Linear(128, 128),
            torch.nn.Tanh(),
            torch.nn.Linear(128, 1),
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=peak_lr, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        gen = torch.Generator().manual_seed(1234)
        self.x = torch.randn(512, 32, generator=gen)
        self.y = self.x[:, :4].sum(1, keepdim=True).sin()
        self.losses: list[float] = []
        # Steps whose batch is corrupted (NaN inputs), as a bad shard would be.
        self.poisoned: range = range(0)
        self.checkpoints: list[tuple[int, dict]] = []

    def loss(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        x = self.x * math.nan if len(self.losses) in self.poisoned else self.x
        loss = torch.nn.functional.mse_loss(self.model(x), self.y)
        loss.backward()
        self.losses.append(loss.item())
        return loss

    def checkpoint(self, step: int) -> None:
        state = {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
        }
        self.checkpoints.append((step, state))

    def restore(self, to_step: int, _advice=None) -> int:
        """Loads the newest checkpoint at or before `to_step` (the oldest if none)."""
        step, state = next(((s, c) for s, c in reversed(self.checkpoints) if s <= to_step), self.checkpoints[0])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return step

    def train_plain(self, steps: int = STEPS) -> None:
        for _ in range(steps):
            self.loss()
            self.optimizer.step()
            self.scheduler.step()

    def train_guarded(self, guard, steps: int = STEPS, checkpoint_every: int = 25) -> None:
        for s in range(steps):
            if s % checkpoint_every == 0:
                self.checkpoint(s)
            loss = self.loss()
            if guard.step(loss):
                self.optimizer.step()
            self.scheduler.step()

    def blew_up(self) -> bool:
        return any(not math.isfinite(v) or v > 100 * self.losses[0] for v in self.losses)

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]
