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
        """Every local gradient tensor, for scaling in place."""
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
