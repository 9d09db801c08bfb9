"""The model's norms when its gradients are sharded across ranks.

Under FSDP2 (`fully_shard`), tensor parallelism (`parallelize_module`) and
FSDP1 with a sharding strategy, each rank holds part of each gradient: a norm
measured on it is the shard's. Here every rank measures per-layer sums of
squares of its local pieces, and ONE `all_reduce(SUM)` of that small vector
over the sharding group makes them the model's; their square roots are the
norms `clip_grad_norm_` gives on the unsharded model, on every rank.

A piece held by several ranks of the group (a DTensor's `Replicate` mesh
dimension, a plain tensor beside DTensors) counts once: on the rank whose
coordinate is 0 along each replicated dimension. max |g| per layer needs a MAX:
it rides in the int64 `all_reduce(MAX)` that already agrees on advice across
ranks (non-negative float64 bit patterns order as their values), so a step
still takes two small collectives, as it does without sharding when several
ranks agree. Only a step whose norms come out non-finite pays a third (SUM of
the non-finite counts).

Layers are named by the unsharded parameter names: FSDP2 and tensor
parallelism keep them; FSDP1's flat parameters (`use_orig_params=False`) are
split back into the original parameters through the flat parameter's own
`_fqns` and `_shard_param_infos`.

DeepSpeed ZeRO 1-3 keeps gradients out of `param.grad`: after
`engine.backward` each rank holds its partition of the averaged gradients in
the ZeRO optimizer (`ZeroSharding`). Stages 1 and 2 split the flattened
parameters of each group at partition boundaries, and DeepSpeed's own
mapping (`param._hp_mapping`) names the fragment of each parameter a rank
holds; stage 3 gives every parameter an even partition on every rank (the
last one padded). The same per-layer sums of squares and one reduction over
the data-parallel group make the model's norms.

Plain DDP needs none of this: its gradients are already all-reduced, the same
on every rank, and the local norm is the model's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Piece kinds.
DTENSOR, SLICE, SHARD, REPLICA = range(4)


@dataclass
class Piece:
    param: int  # position in Layers.params
    layer: int
    kind: int
    start: int = 0  # SLICE: the part of a flat parameter's local gradient
    stop: int = 0


class Sharding:
    """How the trainable parameters of a model are spread over ranks."""

    def __init__(self, pieces: list[Piece], group: Any, dist: Any, dtensor: Any):
        self.pieces = pieces
        self.group = group
        self.dist = dist
        self._dtensor = dtensor
        self.group_rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self._counts_cache: dict[tuple[int, tuple[Any, ...]], bool] = {}
        # True after a skipped step whose gradients clearing `param.grad`
        # does not reach (DeepSpeed ZeRO): the optimizer's hook drops them.
        self.skipping = False

    def local_pieces(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """This rank's share of the gradients, of those that count here: the
        local tensors and their layers."""
        tensors, layers = [], []
        for piece in self.pieces:
            g = params[piece.param].grad
            if g is None:
                continue
            if piece.kind == DTENSOR and isinstance(g, self._dtensor):
                g = self._settled(g)
                if not self._counts(g):
                    continue
                g = g.to_local()
            elif piece.kind == SLICE:
                g = g[piece.start : piece.stop]
            elif piece.kind in (REPLICA, DTENSOR) and self.group_rank != 0:
                continue  # a replica (a plain tensor among DTensors): counted on the group's rank 0
            if g.numel():
                tensors.append(g)
                layers.append(piece.layer)
        return tensors, layers

    def local_grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every local gradient tensor, for scaling in place (what the
        optimizer step will read)."""
        out = []
        for p in params:
            g = p.grad
            if g is None:
                continue
            if isinstance(g, self._dtensor):
                g = g.to_local()
            if g.numel():
                out.append(g)
        return out

    def grad_scale(self) -> float:
        """The factor the gradients held are scaled by (a loss scale that
        the optimizer step takes off), to divide the norms by."""
        return 1.0

    def skip(self) -> None:
        """Called when a step is skipped, after `param.grad` is cleared,
        which is enough here."""

    def _settled(self, g: Any) -> Any:
        """A gradient still `Partial` (a pending sum) is summed first: a
        square of the sum is not the sum of the squares. Rare: FSDP2 and the
        parallel styles hand back Shard or Replicate gradients."""
        if not any(p.is_partial() for p in g.placements):
            return g
        from torch.distributed.tensor import Replicate

        return g.redistribute(g.device_mesh, [Replicate() if p.is_partial() else p for p in g.placements])

    def _counts(self, g: Any) -> bool:
        """Whether this rank's local tensor of `g` counts: it does unless a
        lower-coordinate rank holds the same replica."""
        key = (id(g.device_mesh), tuple(g.placements))
        counts = self._counts_cache.get(key)
        if counts is None:
            coord = g.device_mesh.get_coordinate()
            counts = coord is not None and all(c == 0 for c, p in zip(coord, g.placements) if p.is_replicate())
            self._counts_cache[key] = counts
        return counts


def detect(
    named: Sequence[tuple[str, torch.Tensor]], model: torch.nn.Module
) -> tuple[Any, list[tuple[str, Piece]], Any] | None:
    """(process group, [(parameter name, piece)], DTensor type) of a sharded
    model, or None
    when no gradient is sharded (single process, DDP, FSDP1 NO_SHARD). Free
    when neither DTensor nor FSDP1 was ever imported: a model cannot use them
    then."""
    dtensor_mod = sys.modules.get("torch.distributed.tensor")
    fsdp1_mod = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    dtensor = getattr(dtensor_mod, "DTensor", None) if dtensor_mod is not None else None
    meshes = [p.device_mesh for _, p in named if dtensor is not None and isinstance(p, dtensor)]
    flat = _fsdp1_handles(model, fsdp1_mod)
    if not meshes and not flat:
        return None
    dist = torch.distributed
    if meshes and flat:
        raise ValueError("gradguard: FSDP1 over DTensor parameters is not supported; use FSDP2 (fully_shard)")

    entries: list[tuple[str, Piece]] = []
    if meshes:
        group = _mesh_group(meshes, dist)
        for i, (name, p) in enumerate(named):
            entries.append((name, Piece(i, -1, DTENSOR)))
        return group, entries, dtensor

    group = None
    for i, (name, p) in enumerate(named):
        handle = flat.get(id(p))
        if handle is None:
            entries.append((name, Piece(i, -1, REPLICA)))
            continue
        fsdp_module, flat_param = handle
        group = fsdp_module.process_group
        if flat_param is not p:  # use_orig_params=True: a view of this rank's part
            entries.append((name, Piece(i, -1, SHARD)))
            continue
        prefix = name[: -len("_flat_param")]
        fqns: list[str] = getattr(flat_param, "_fqns")  # noqa: B009 (FSDP1's private fields)
        infos: list[Any] = getattr(flat_param, "_shard_param_infos")  # noqa: B009
        for fqn, info in zip(fqns, infos):
            if info.in_shard:
                start = info.offset_in_shard
                entries.append((prefix + fqn, Piece(i, -1, SLICE, start, start + info.numel_in_shard)))
            else:  # the layer exists on every rank, measured where it lies
                entries.append((prefix + fqn, Piece(i, -1, SLICE, 0, 0)))
    return group, entries, dtensor


def _fsdp1_handles(model: torch.nn.Module, fsdp1_mod: Any) -> dict[int, tuple[Any, Any]]:
    """id(parameter) -> (FSDP module, flat parameter) for every parameter an
    FSDP1 module shards (the flat parameter itself, or with
    `use_orig_params=True` the original parameters viewing into it)."""
    if fsdp1_mod is None:
        return {}
    out: dict[int, tuple[Any, Any]] = {}
    for m in model.modules():
        if not isinstance(m, fsdp1_mod.FullyShardedDataParallel):
            continue
        handle = getattr(m, "_handle", None)
        if handle is None or not handle.uses_sharded_strategy:
            continue
        fp = handle.flat_param
        out[id(fp)] = (m, fp)
        for p in getattr(fp, "_params", None) or ():
            out[id(p)] = (m, fp)
    return out


def _mesh_group(meshes: list[Any], dist: Any) -> Any:
    first = meshes[0]
    if any(m != first for m in meshes[1:]):
        raise ValueError(
            "gradguard: DTensor parameters on different device meshes are not supported "
            "(one mesh for the whole model: FSDP2, tensor parallel, or both on one 2-D mesh)"
        )
    if first.ndim == 1:
        return first.get_group()
    if first.size() == dist.get_world_size():
        return None  # the default group spans the mesh
    raise ValueError("gradguard: a multi-dimensional device mesh must span all ranks")


# DeepSpeed's ZeRO optimizers: (module, class) -> stage (1 or 2 is the
# optimizer's `partition_gradients`). Looked up only once deepspeed is
# imported: a model cannot use them otherwise.
_ZERO_CLASSES = {
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer"): 1,
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3"): 3,
}


class ZeroSharding(Sharding):
    """DeepSpeed ZeRO: the gradients a rank holds after `engine.backward` are
    its partition, in the ZeRO optimizer. Every piece is held by one rank
    only (data-parallel ranks average the gradients before partitioning), so
    each counts where it lies."""

    def __init__(self, optimizer: Any, stage: int, params: list[torch.Tensor], layer_of: list[int], group: Any):
        super().__init__([], group, torch.distributed, None)
        self.optimizer = optimizer
        self.stage = stage
        self._layer_of = layer_of
        # Stage 3: (parameter, sub-group, position in it, elements of real data in this rank's partition).
        self._z3: list[tuple[int, int, int, int]] = []
        if stage == 3:
            where = {id(p): (i, j) for i, sub in enumerate(optimizer.fp16_groups) for j, p in enumerate(sub)}
            for k, p in enumerate(params):
                if id(p) not in where:
                    raise ValueError(
                        "gradguard: a trainable parameter of the model is not in DeepSpeed's ZeRO-3 optimizer"
                    )
                n = int(p.partition_numel())  # type: ignore[attr-defined]  # DeepSpeed's partitioned parameter
                numel = int(p.ds_numel)  # type: ignore[attr-defined]
                real = max(0, min(n, numel - self.group_rank * n))
                self._z3.append((k, *where[id(p)], real))

    def _fragments(self, params: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        """(parameter position, this rank's gradient fragment of it)."""
        out = []
        if self.stage == 3:
            grads = self.optimizer.averaged_gradients
            for k, i, j, real in self._z3:
                if grads.get(i) is None:
                    raise RuntimeError(
                        "gradguard: DeepSpeed holds no gradients now: call guard.step after engine.backward at a "
                        "gradient accumulation boundary, before engine.step"
                    )
                g = grads[i][j]
                out.append((k, g.narrow(0, 0, real) if real < g.numel() else g))
            return out
        for k, p in enumerate(params):
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # no part of it in this rank's partition
                continue
            g = mapping.get_lp_grad_fragment(p._index_in_param_group)  # type: ignore[attr-defined]
            address = mapping.lp_fragment_address
            if g.numel() == p.numel() and address.numel != p.numel():  # a whole gradient kept: its fragment
                g = g.reshape(-1).narrow(0, address.start, address.numel)
            out.append((k, g))
        return out

    def local_pieces(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        self.skipping = False  # a new step
        tensors, layers = [], []
        for k, g in self._fragments(params):
            if g.numel():
                tensors.append(g)
                layers.append(self._layer_of[k])
        return tensors, layers

    def local_grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [g for _, g in self._fragments(params) if g.numel()]

    def grad_scale(self) -> float:
        return float(getattr(self.optimizer, "loss_scale", 1.0))

    def skip(self) -> None:
        """The ZeRO optimizer's step reads its own partitions: the wrapped
        optimizer's step (once per parameter group) finds its gradients
        dropped (Guard._before_optimizer_step) until the next step is
        measured, so the parameters and the optimizer state stay as they
        were. DeepSpeed's loss scaling still sees an overflow as its own."""
        self.skipping = True


def zero_sharding(
    named: Sequence[tuple[str, torch.Tensor]], model: torch.nn.Module, optimizer: Any, layer_of: list[int]
) -> ZeroSharding | None:
    """How DeepSpeed's ZeRO (stages 1-3) partitions the gradients of this
    model, or None when it does not. The ZeRO optimizer is the one given, the
    engine's (`model` a DeepSpeedEngine), or the one DeepSpeed linked to the
    parameters. Free when deepspeed was never imported."""
    if "deepspeed" not in sys.modules:
        return None
    classes = []
    for (module, name), stage in _ZERO_CLASSES.items():
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            classes.append((cls, stage))
    candidates = [optimizer, getattr(model, "optimizer", None)]
    for _, p in named:
        candidates += [getattr(p, "_z3_optimizer", None), getattr(p, "_zero_optimizer", None)]
    found: tuple[Any, int] | None = next(
        ((c, stage) for c in candidates for cls, stage in classes if isinstance(c, cls)), None
    )
    if found is None:
        if any(hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None for _, p in named):
            wrapper = type(getattr(model, "optimizer", None) or optimizer).__name__
            raise ValueError(
                f"gradguard: DeepSpeed keeps this model's gradients in {wrapper}, which gradguard does not read; "
                "supported: ZeRO stages 1-3 (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)"
            )
        return None
    zero, stage = found
    params = [p for _, p in named]
    if getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False):
        raise ValueError("gradguard: DeepSpeed ZeRO with the optimizer offloaded is not supported")
    if stage == 3:
        groups = [zero.dp_process_group] + [getattr(p, "ds_process_group", zero.dp_process_group) for p in params]
    else:
        stage = 2 if zero.partition_gradients else 1
        groups = list(zero.real_dp_process_group)
    dist = torch.distributed
    ranks = {tuple(dist.get_process_group_ranks(g or dist.group.WORLD)) for g in {id(g): g for g in groups}.values()}
    if len(ranks) > 1:
        raise ValueError("gradguard: DeepSpeed ZeRO with several data-parallel groups (MoE experts) is not supported")
    return ZeroSharding(zero, stage, params, layer_of, groups[0])
