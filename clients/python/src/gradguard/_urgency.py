"""Which summaries go to the service at once rather than linger."""

from __future__ import annotations

import math

from ._measure import Measurement
from .v1 import gradguard_pb2 as pb


class _Ema:
    """The service's moving mean and spread (`engine/stats.rs`): Welford's
    over the warm-up, exponential after it."""

    def __init__(self, alpha: float, warmup: int):
        self.alpha, self.warmup = alpha, max(warmup, 2)
        self.n, self.mean, self.var = 0, 0.0, 0.0

    @property
    def ready(self) -> bool:
        return self.n >= self.warmup

    def std(self) -> float:
        return max(math.sqrt(self.var), abs(self.mean) * 1e-3)

    def push(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        if self.n <= self.warmup:
            self.mean += d / self.n
            self.var += (d * (x - self.mean) - self.var) / self.n
        else:
            self.mean += (1 - self.alpha) * d
            self.var = self.alpha * (self.var + (1 - self.alpha) * d * d)


class Urgency:
    """Which summaries go at once rather than linger: those on which the
    service's rules would advise something, judged on the worker the way the
    service judges them (non-finite values, a gradient spike worth clipping,
    a loss spike). A false alarm costs one message; a miss delays that step's
    advice by at most `linger` seconds.

    The thresholds are the job's own, from the service's Welcome
    (`configure`); until one arrives (or from a service too old to send
    them, or through Kafka), the service's defaults."""

    # The service's defaults (config/grad.rs, config/loss.rs): grad_spike and loss_spike.
    ALPHA, WARMUP = 0.97, 25
    Z, SEVERE_Z, MIN_CLIP_RATIO = 2.5, 6.0, 1.25
    RISE, LOSS_WARMUP = 0.2, 25

    def __init__(self) -> None:
        self.grad = True
        self.alpha, self.warmup = self.ALPHA, self.WARMUP
        self.z, self.severe_z, self.min_clip_ratio = self.Z, self.SEVERE_Z, self.MIN_CLIP_RATIO
        self.loss = True
        self.rise, self.loss_warmup = self.RISE, self.LOSS_WARMUP
        self._norm = _Ema(self.alpha, self.warmup)
        self._loss = _Ema(self.ALPHA, self.loss_warmup)

    def configure(self, rules: pb.UrgencyRules) -> None:
        """Takes the job's thresholds (on every Welcome: a reconnection keeps
        the moving averages unless their shape changed)."""
        self.grad, self.loss = rules.grad_spike_enabled, rules.loss_spike_enabled
        self.z, self.severe_z = rules.grad_z, rules.grad_severe_z
        self.min_clip_ratio, self.rise = rules.grad_min_clip_ratio, rules.loss_min_rise
        if (rules.grad_alpha, rules.grad_warmup) != (self.alpha, self.warmup):
            self.alpha, self.warmup = rules.grad_alpha, rules.grad_warmup
            self._norm = _Ema(self.alpha, self.warmup)
        if rules.loss_warmup != self.loss_warmup:
            self.loss_warmup = rules.loss_warmup
            self._loss = _Ema(self.ALPHA, self.loss_warmup)

    def __call__(self, m: Measurement) -> bool:
        if not m.finite or (m.loss is not None and not math.isfinite(m.loss)):
            return True
        urgent, n, ema = False, m.grad_norm, self._norm
        if ema.ready and self.grad:
            bound = ema.mean + self.z * ema.std()
            z = (n - ema.mean) / ema.std()
            urgent = n >= self.min_clip_ratio * bound or z >= self.severe_z
            n = min(n, bound)  # ZClip: a spike does not inflate the baseline
        ema.push(n)
        if m.loss is not None:
            ema = self._loss
            urgent |= self.loss and ema.ready and ema.mean > 0 and m.loss > ema.mean * (1 + self.rise)
            ema.push(m.loss)
        return urgent
