"""Writes the fixtures of `tests/replay_formats.rs` with the real producing libraries.

    python tests/data/formats/make_fixtures.py OUT_DIR

Under OUT_DIR:

- `tb/torch/`: torch's `SummaryWriter.add_scalar` (`simple_value`): train/loss,
  train/grad_norm, train/learning_rate over 50 steps, a NaN loss at step 30 and a
  grad-norm spike at step 40, plus tags of no field (train/epoch, a histogram,
  a text) that must be ignored;
- `tb/newstyle/`: the same through `add_scalar(..., new_style=True)` (scalar
  tensors), under the tags Loss/train, grad_norm, lr;
- `tb/tbwriter/`: the tensorboard package's own `tensorboard.summary.Writer`
  (scalar tensors, TF2 style), tags loss, gradient_norm, learning_rate;
- `lightning/`: Lightning's `CSVLogger` (`log_metrics` of train_loss, lr-SGD and
  grad_2.0_norm_total each step, and a separate validation row of val_loss every
  10 steps): `lightning/lit/version_0/metrics.csv`;
- `expected.json`: what each of them holds, per step: `[step, loss, grad_norm,
  lr]` as written (NaN as the string "NaN").
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

STEPS = 50
NAN_STEP = 30
SPIKE_STEP = 40


def series() -> list[tuple[int, float, float, float]]:
    rows = []
    for step in range(1, STEPS + 1):
        loss = 2.5 - 0.02 * step + 0.01 * math.sin(step)
        norm = 1.0 + 0.1 * math.cos(step)
        lr = 1e-3 * (1.0 - step / (2 * STEPS))
        if step == NAN_STEP:
            loss = float("nan")
        if step == SPIKE_STEP:
            norm = 5000.0
        rows.append((step, loss, norm, lr))
    return rows


def f32(x: float) -> float:
    return float(np.float32(x))


def as_json(x: float) -> float | str:
    return "NaN" if math.isnan(x) else x


def main() -> None:
    out = Path(sys.argv[1])
    rows = series()
    expected: dict[str, list[list[float | str | int]]] = {}

    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(out / "tb" / "torch"))
    for step, loss, norm, lr in rows:
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/grad_norm", norm, step)
        w.add_scalar("train/learning_rate", lr, step)
        w.add_scalar("train/epoch", step / 10, step)
        if step % 10 == 0:
            w.add_histogram("weights", np.arange(10.0) * step, step)
            w.add_text("note", f"step {step}", step)
    w.close()
    expected["torch"] = [[s, as_json(f32(a)), f32(b), f32(c)] for s, a, b, c in rows]

    w = SummaryWriter(log_dir=str(out / "tb" / "newstyle"))
    for step, loss, norm, lr in rows:
        w.add_scalar("Loss/train", loss, step, new_style=True)
        w.add_scalar("grad_norm", norm, step, new_style=True)
        w.add_scalar("lr", lr, step, new_style=True)
    w.close()
    expected["newstyle"] = expected["torch"]

    from tensorboard.summary import Writer

    w = Writer(str(out / "tb" / "tbwriter"))
    for step, loss, norm, lr in rows:
        w.add_scalar("loss", loss, step)
        w.add_scalar("gradient_norm", norm, step)
        w.add_scalar("learning_rate", lr, step)
    w.close()
    expected["tbwriter"] = expected["torch"]

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(out / "lightning"), name="lit", version=0)
    for step, loss, norm, lr in rows:
        logger.log_metrics({"train_loss": loss, "lr-SGD": lr, "grad_2.0_norm_total": norm, "epoch": step // 10}, step=step)
        if step % 10 == 0:
            logger.log_metrics({"val_loss": loss + 0.1, "epoch": step // 10}, step=step)
    logger.save()
    logger.finalize("success")
    expected["lightning"] = [[s, as_json(a), b, c] for s, a, b, c in rows]

    (out / "expected.json").write_text(json.dumps(expected))


if __name__ == "__main__":
    main()
