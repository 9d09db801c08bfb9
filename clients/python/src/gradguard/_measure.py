"""Per-layer gradient statistics of a model, measured once per optimizer step.

Cost model: one fused reduction over the gradients (L2 per parameter,
accumulated in float32 whatever the gradient dtype; on the CPU, large float32
gradients take a BLAS dot instead, up to twice as fast as the norm kernel
there), a second for max |g| on accelerators (fused; on the CPU it is off by
default: a second pass over memory, and one vectorised min/max per tensor when
asked for, since the fused inf-norm is slow there), a scatter of those
per-parameter values into layers (float64, so squares of huge norms do not
overflow), and ONE device-to-host copy of a packed vector. Only a step whose
gradients hold NaN or Inf pays a second pass to count them.

Gradients sharded across ranks (FSDP, tensor parallelism, DeepSpeed ZeRO)
take `Layers.measure_sharded`: the same per-layer sums of squares of each rank's
local shards, then one all_reduce makes them the model's (see _sharded.py).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from . import _sharded

_foreach = getattr(torch, "foreach", None)  # public since torch 2.15
_norm = _foreach.norm if _foreach is not None else torch._foreach_norm
_mul_ = _foreach.mul_ if _foreach is not None else torch._foreach_mul_

# On the CPU, float32 gradients from this many elements up get their sum of
# squares from a BLAS dot (8 us for 64 Ki elements against 11-17 us for the
# norm kernel, which is neither vectorised as well nor threaded); smaller ones stay
# in the one fused call, where each costs under 2 us.
DOT_MIN_NUMEL = 16_384

# Prefixes that wrappers add to parameter names (DDP, FSDP, torch.compile).
_WRAPPERS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def layer_name(parameter: str) -> str:
    """The layer a parameter belongs to: its owning module's dotted name
    (`encoder.0.weight` -> `encoder.0`), wrapper prefixes removed."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPERS:
            if parameter.startswith(prefix):
                parameter = parameter[len(prefix) :]
                stripped = True
        parameter = parameter.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")
    module, _, _ = parameter.rpartition(".")
    return module or parameter


@dataclass
class Measurement:
    """What one step's gradients looked like, on the host."""

    grad_norm: float
    layer_l2: list[float]
    # Empty when not measured (see Layers.measure).
    layer_max_abs: list[float]
    layer_nonfinite: list[int]
    loss: float | None = None
    loss_scale: float | None = None
    # The cross-rank agreement (an int64) that rode along with the copy.
    agreed: int | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.grad_norm) and not any(self.layer_nonfinite)


class Layers:
    """The trainable parameters of a model, grouped into layers in model order."""

    def __init__(self, model: torch.nn.Module, optimizer: Any = None):
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self._layer_of: list[int] = []
        # Set when gradients are sharded across ranks (see _sharded.py).
        self.sharding: _sharded.Sharding | None = None
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        found = _sharded.detect(named, model)
        if found is not None:
            self._init_sharded(model, named, *found)
            return
        index: dict[str, int] = {}
        for name, p in named:
            layer = layer_name(name)
            if layer not in index:
                index[layer] = len(self.names)
                self.names.append(layer)
            self.params.append(p)
            self._layer_of.append(index[layer])
        # Scatter indices per (device, which parameters have gradients).
        self._index_cache: dict[tuple[torch.device, int, int, int], torch.Tensor] = {}
        # CPU: which of the present gradients take a dot (see _dot_split).
        self._dot_cache: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
        # DeepSpeed ZeRO: the unsharded parameters and names, the gradients in its optimizer.
        self.sharding = _sharded.zero_sharding(named, model, optimizer, self._layer_of)

    def _init_sharded(
        self,
        model: torch.nn.Module,
        named: Sequence[tuple[str, torch.Tensor]],
        group: Any,
        entries: list[tuple[str, _sharded.Piece]],
        dtensor: Any,
    ) -> None:
        self.params = [p for _, p in named]
        layers = [layer_name(name) for name, _ in entries]
        if any(piece.kind == _sharded.SLICE for _, piece in entries):
            # FSDP1 flat parameters list the root's leftovers first: back to model order.
            order = {layer_name(f"{name}.p"): i for i, (name, _) in enumerate(model.named_modules())}
            unique = sorted(dict.fromkeys(layers), key=lambda layer: order.get(layer, len(order)))
        else:
            unique = list(dict.fromkeys(layers))
        self.names = unique
        index = {layer: i for i, layer in enumerate(unique)}
        for layer, (_, piece) in zip(layers, entries):
            piece.layer = index[layer]
        self.sharding = _sharded.Sharding([piece for _, piece in entries], group, torch.distributed, dtensor)

    def grads(self) -> tuple[list[torch.Tensor], list[int]]:
        """The gradients present this step, and the position of each parameter."""
        grads, present = [], []
        for i, p in enumerate(self.params):
            if p.grad is not None:
                grads.append(p.grad)
                present.append(i)
        return grads, present

    def _index(self, present: list[int], device: torch.device) -> torch.Tensor:
        key = (device, len(present), present[0], present[-1]) if len(present) == len(self.params) else None
        cached = self._index_cache.get(key) if key else None
        if cached is not None:
            return cached
        idx = torch.tensor([self._layer_of[i] for i in present], dtype=torch.long, device=device)
        if key:
            self._index_cache[key] = idx
        return idx

    def measure(
        self,
        loss: torch.Tensor | float | None = None,
        loss_scale: torch.Tensor | float | None = None,
        agree: torch.Tensor | None = None,
        max_abs: bool | None = None,
    ) -> Measurement:
        """Measures the gradients as they are now (call after unscaling).

        `loss` and `loss_scale` may be device tensors: they travel in the same
        copy. `agree` is a one-element tensor (already reduced across ranks)
        that rides along too. `max_abs`: measure max |g| per layer; by default
        on accelerators (fused, nearly free) but not on the CPU, where it is a
        second pass over the gradients (a NaN or Inf shows in the L2 norm all
        the same).
        """
        if self.sharding is not None:
            if agree is not None:
                raise ValueError("sharded gradients: give the local advice id to measure_sharded")
            return self.measure_sharded(loss, loss_scale, max_abs=max_abs)
        grads, present = self.grads()
        n = len(self.names)
        if not grads:
            zeros = [0.0] * n
            return Measurement(0.0, zeros, [], [0] * n, _host(loss), _host(loss_scale), _host_int(agree))
        device = grads[0].device
        if max_abs is None:
            max_abs = device.type != "cpu"
        if device.type == "cpu":
            return self._measure_on_host(grads, present, loss, loss_scale, agree, max_abs)
        l2 = _stack_on(_norm(grads, ord=2.0, dtype=torch.float32), device)
        idx = self._index(present, device)
        sq = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, idx, l2.double().square())
        columns = [sq.sqrt()]
        if max_abs:
            columns.append(
                torch.zeros(n, dtype=torch.float64, device=device).scatter_reduce_(
                    0, idx, _max_abs(grads, device).double(), reduce="amax", include_self=True
                )
            )
        tail = [sq.sum().sqrt().reshape(1), _scalar(loss, device), _scalar(loss_scale, device)]
        # The int64 rides bit for bit (a view, not a conversion): ids use all 63 bits.
        tail.append(torch.zeros(1, dtype=torch.float64, device=device) if agree is None else _bits(agree, device))
        packed = torch.cat([*columns, *tail]).tolist()  # the one device-to-host copy
        layer_l2 = packed[:n]
        layer_max_abs = packed[n : 2 * n] if max_abs else []
        total, loss_v, scale_v, agreed = packed[len(columns) * n :]
        nonfinite = [0] * n
        if not math.isfinite(total) or any(not math.isfinite(v) for v in layer_l2 + layer_max_abs):
            nonfinite = self._count_nonfinite(grads, idx, device)
        return Measurement(
            grad_norm=total,
            layer_l2=layer_l2,
            layer_max_abs=layer_max_abs,
            layer_nonfinite=nonfinite,
            loss=None if loss is None else loss_v,
            loss_scale=None if loss_scale is None else scale_v,
            agreed=None if agree is None else _unbits(agreed),
        )

    def measure_sharded(
        self,
        loss: torch.Tensor | float | None = None,
        loss_scale: torch.Tensor | float | None = None,
        agree: int | None = None,
        agree_group: Any = None,
        max_abs: bool | None = None,
    ) -> Measurement:
        """`measure` for gradients sharded across ranks (see _sharded.py):
        the model's norms, the same on every rank of the sharding group.
        Collective: every rank of the group calls it at the same step.

        `agree`: this rank's highest job-wide advice id; its minimum over
        `agree_group` comes back in `agreed`, from the same all_reduce as max
        |g|. `loss` stays this rank's."""
        sh = self.sharding
        if sh is None:
            raise RuntimeError("measure_sharded on a model whose gradients are not sharded")
        dist = sh.dist
        n = len(self.names)
        with torch.no_grad():
            tensors, layers = sh.local_pieces(self.params)
        backend = str(dist.get_backend(sh.group))
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        if max_abs is None:  # decided alike on every rank: some may hold no piece
            max_abs = self.params[0].device.type != "cpu"
        sq = torch.zeros(n, dtype=torch.float64, device=device)
        if tensors:
            gdev = tensors[0].device
            idx = torch.tensor(layers, dtype=torch.long, device=gdev)
            local = torch.zeros(n, dtype=torch.float64, device=gdev).index_add_(
                0, idx, _stack_on(_norm(tensors, ord=2.0, dtype=torch.float32), gdev).double().square()
            )
            sq = local.to(device)
        if sh.group_size > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=sh.group)  # the one reduction of the norms
        # One int64 MAX carries max |g| (the bits of a float64 >= 0 order as
        # its value; NaN above Inf) and the negated advice id (MAX of -id is
        # -MIN of id).
        high = []
        if max_abs:
            mx = torch.zeros(n, dtype=torch.float64, device=device)
            if tensors:
                top = torch.zeros(n, dtype=torch.float64, device=gdev).scatter_reduce_(
                    0, idx, _max_abs(tensors, gdev).double(), reduce="amax", include_self=True
                )
                mx = top.abs().to(device)  # abs: no sign bit, on -0.0 or a NaN
            high.append(mx.view(torch.int64))
        if agree is not None:
            high.append(torch.tensor([-agree], dtype=torch.int64, device=device))
        if high:
            hv = torch.cat(high)
            if agree is not None:
                dist.all_reduce(hv, op=dist.ReduceOp.MAX, group=agree_group)
            elif sh.group_size > 1:
                dist.all_reduce(hv, op=dist.ReduceOp.MAX, group=sh.group)
            high = [hv.view(torch.float64)]
        packed = torch.cat([sq, *high, _scalar(loss, device), _scalar(loss_scale, device)]).tolist()
        unscale = 1.0 / sh.grad_scale()  # 1 but under DeepSpeed's own loss scaling
        squares = packed[:n]
        layer_l2 = [math.sqrt(v) * unscale for v in squares]
        total = math.sqrt(sum(squares)) * unscale
        layer_max_abs = [v * unscale for v in packed[n : 2 * n]] if max_abs else []
        agreed = -_unbits(packed[-3]) if agree is not None else None
        nonfinite = [0] * n
        if not math.isfinite(total) or any(not math.isfinite(v) for v in layer_max_abs):
            # Decided on reduced values: every rank of the group takes this branch.
            counts = torch.zeros(n, dtype=torch.long, device=device)
            if tensors:
                per = torch.stack([(~torch.isfinite(t)).sum() for t in tensors])
                counts = torch.zeros(n, dtype=torch.long, device=gdev).index_add_(0, idx, per).to(device)
            if sh.group_size > 1:
                dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=sh.group)
            nonfinite = [int(c) for c in counts.tolist()]
        return Measurement(
            grad_norm=total,
            layer_l2=layer_l2,
            layer_max_abs=layer_max_abs,
            layer_nonfinite=nonfinite,
            loss=None if loss is None else packed[-2],
            loss_scale=None if loss_scale is None else packed[-1],
            agreed=agreed,
        )

    def _measure_on_host(
        self,
        grads: list[torch.Tensor],
        present: list[int],
        loss: torch.Tensor | float | None,
        loss_scale: torch.Tensor | float | None,
        agree: torch.Tensor | None,
        max_abs: bool,
    ) -> Measurement:
        """The CPU path: the same fused norms and one copy of the
        per-parameter values, then the grouping into layers in Python. Each
        small tensor op costs 5-20 us on the CPU (dispatch, not math), so the
        device path's dozen of them cost more than the loop over a few hundred
        floats that replaces them. Accelerators keep the grouping on the
        device, where small ops are asynchronous."""
        k = len(grads)
        cpu = torch.device("cpu")
        fused, dotted = self._dot_split(grads, present)
        values: list[torch.Tensor | None] = [None] * k  # every one set below
        if fused:
            for i, v in zip(fused, _norm([grads[i] for i in fused], ord=2.0, dtype=torch.float32)):
                values[i] = v
        for i in dotted:  # sums of squares, not norms
            g = grads[i]
            if g.dtype is torch.float32:
                flat = g.reshape(-1)
                values[i] = torch.dot(flat, flat)
            else:  # the same parameter in another dtype this step
                values[i] = _norm([g], ord=2.0, dtype=torch.float32)[0].square()
        scalars: list[float | None] = []  # loss, loss scale given on the host (tensors ride in `values`)
        for v in (loss, loss_scale):
            if isinstance(v, torch.Tensor):
                values.append(v.detach().reshape(-1)[0].float())  # float32, as losses are
                scalars.append(None)
            else:
                scalars.append(None if v is None else float(v))
        packed_t = torch.stack(cast("list[torch.Tensor]", values))
        if max_abs:
            packed_t = torch.cat([packed_t, _max_abs(grads, cpu)])
        if agree is not None:  # an int64 that needs all its bits: float64, bit-cast
            packed_t = torch.cat([packed_t.double(), _bits(agree, cpu)])
        packed = packed_t.tolist()  # the one copy

        n = len(self.names)
        layer_of = [self._layer_of[i] for i in present]
        squares = [v * v for v in packed[:k]]  # in float64, as on the device
        for i in dotted:
            squares[i] = packed[i]
            if math.isinf(packed[i]):  # a float32 sum of squares overflows at norms of 1.8e19
                squares[i] = float(torch.linalg.vector_norm(grads[i], dtype=torch.float64).square())
        sq = [0.0] * n
        for j, v in zip(layer_of, squares):
            sq[j] += v
        layer_l2 = [math.sqrt(v) for v in sq]
        total = math.sqrt(sum(sq))
        rest = iter(packed[k:])
        loss_v, scale_v = [
            next(rest) if isinstance(v, torch.Tensor) else h for h, v in zip(scalars, (loss, loss_scale))
        ]
        layer_max_abs: list[float] = []
        if max_abs:
            layer_max_abs = [0.0] * n
            for j, v in zip(layer_of, rest):
                if math.isnan(v) or v > layer_max_abs[j]:  # NaN wins, as amax does
                    layer_max_abs[j] = v
        agreed = _unbits(packed[-1]) if agree is not None else None
        nonfinite = [0] * n
        if not math.isfinite(total) or any(not math.isfinite(v) for v in layer_max_abs):
            nonfinite = self._count_nonfinite(grads, self._index(present, cpu), cpu)
        return Measurement(total, layer_l2, layer_max_abs, nonfinite, loss_v, scale_v, agreed)

    def _dot_split(self, grads: list[torch.Tensor], present: list[int]) -> tuple[list[int], list[int]]:
        """Positions (in `grads`) measured by the fused norm, and by a dot."""
        key = tuple(present)
        split = self._dot_cache.get(key)
        if split is None:
            fused: list[int] = []
            dotted: list[int] = []
            for i, g in enumerate(grads):
                big = g.dtype is torch.float32 and g.numel() >= DOT_MIN_NUMEL
                (dotted if big else fused).append(i)
            split = self._dot_cache[key] = (fused, dotted)
        return split

    def _count_nonfinite(self, grads: list[torch.Tensor], idx: torch.Tensor, device: torch.device) -> list[int]:
        counts = torch.stack([(~torch.isfinite(g)).sum().to(device) for g in grads])
        per_layer = torch.zeros(len(self.names), dtype=torch.long, device=device).index_add_(0, idx, counts)
        return [int(c) for c in per_layer.tolist()]

    def scale_grads(self, factor: float) -> None:
        """Multiplies every gradient by `factor` (a host float: no sync)."""
        if self.sharding is not None:
            with torch.no_grad():
                grads = self.sharding.local_grads(self.params)
        else:
            grads, _ = self.grads()
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for group in by_device.values():
            _mul_(group, factor)

    def clear_grads(self) -> None:
        """Drops the gradients, so that an optimizer step changes nothing."""
        for p in self.params:
            p.grad = None
        if self.sharding is not None:
            self.sharding.skip()


def _max_abs(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """max |g| of each gradient, as float32 on `device`."""
    if device.type != "cpu":
        return _stack_on(_norm(grads, ord=math.inf, dtype=torch.float32), device)
    # On the CPU the inf-norm kernel is not vectorised (10x slower than the L2
    # norm); min and max in one vectorised pass each is not.
    lows, highs = [], []
    for g in grads:
        if g.numel():
            low, high = torch.aminmax(g)
        else:
            low = high = g.new_zeros(())
        lows.append(low)
        highs.append(high)
    return torch.maximum(torch.stack(highs), torch.stack(lows).neg()).float()


def _stack_on(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.stack([t.to(device, non_blocking=True) for t in tensors])


def _scalar(value: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
    if value is None:
        return torch.zeros(1, dtype=torch.float64, device=device)
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1)[:1].to(device=device, dtype=torch.float64)
    return torch.tensor([float(value)], dtype=torch.float64, device=device)


def _bits(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    return value.detach().reshape(-1)[:1].to(device=device, dtype=torch.int64).view(torch.float64)


def _unbits(value: float) -> int:
    bits: int = struct.unpack("<q", struct.pack("<d", value))[0]
    return bits


def _host(value: torch.Tensor | float | None) -> float | None:
    if value is None:
        return None
    return float(value.detach().reshape(-1)[0]) if isinstance(value, torch.Tensor) else float(value)


def _host_int(value: torch.Tensor | None) -> int | None:
    return None if value is None else int(value.reshape(-1)[0])
