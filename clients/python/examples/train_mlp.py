"""A training run that diverges, and gradguard bringing it back.

    cargo run --release -- serve                 # in another terminal (from the repository root)
    python examples/train_mlp.py                 # guarded: finishes with a low loss
    python examples/train_mlp.py --no-guard      # the same run alone: NaN by step ~90

A 3-layer MLP trained with SGD and momentum whose learning-rate warm-up ends
above the edge of stability. The guard streams every step to the service
(`--server`, default localhost:50051), clips, scales the learning rate or rolls
back to an in-memory checkpoint as advised. With no service running the run
goes on unguarded (and diverges): the client never raises into the loop.

Each run is a new job (`example-mlp-<time>-<pid>`, printed at the start), so running
it again starts afresh rather than continuing the last run's job (whose steps
the service already has); `--job NAME` names it yourself.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import time

import torch

import gradguard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="localhost:50051")
    ap.add_argument("--job", default=None, help="the job's name (default: example-mlp-<time>-<pid>, new each run)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=0.2, help="peak learning rate (0.05 trains without trouble)")
    ap.add_argument("--mode", choices=["enforce", "observe"], default="enforce")
    ap.add_argument("--no-guard", action="store_true", help="train without gradguard")
    args = ap.parse_args()
    if args.job is None:
        args.job = f"example-mlp-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not args.no_guard:
        print(f"job {args.job} on {args.server}")

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    x = torch.randn(512, 32)
    y = x[:, :4].sum(1, keepdim=True).sin()

    checkpoints: dict[int, dict] = {}

    def save(step: int) -> None:
        checkpoints[step] = copy.deepcopy(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        )

    def rollback(to_step: int, advice) -> None:
        step = max((s for s in checkpoints if s <= to_step), default=min(checkpoints))
        state = checkpoints[step]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        print(f"rolled back to the checkpoint of step {step} ({advice.reason})")

    guard = None
    if not args.no_guard:
        # The three lines: watch, then guard.step(loss) between backward() and step().
        guard = gradguard.watch(
            model,
            optimizer,
            job=args.job,
            server=args.server,
            mode=args.mode,
            scheduler=scheduler,
            on_rollback=rollback,
        )
    for step in range(args.steps):
        if step % 25 == 0:
            save(step)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if guard is None or guard.step(loss):
            optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3e}")
    if guard is not None:
        guard.close()
        print(guard.stats)
    final = loss.item()
    print("finished with a finite loss" if math.isfinite(final) else "the run diverged (loss is not finite)")


if __name__ == "__main__":
    main()
