"""`Layout`: how the job is laid out over its ranks, sent in the Hello so
that the service compares a rank's gradient norm only with the ranks that
hold the same part of the model (its replica group).

No torch here: `import gradguard` stays cheap. A `DeviceMesh` is read by its
attributes (`mesh_dim_names`, `size`, `get_coordinate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from .v1 import gradguard_pb2 as pb

# DeviceMesh dimension names, by what they split: the pipeline, tensor
# parallelism, and replicas of the same part (data parallel, sharded data
# parallel whose norms the client reduces to the whole part's, context
# parallel).
PIPELINE_DIM = "pp"
TENSOR_DIM = "tp"
DATA_DIMS = frozenset(
    {"dp", "dp_replicate", "dp_shard", "dp_shard_cp", "dp_cp", "cp", "fsdp", "ddp", "replicate", "shard"}
)


def _size(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"layout: {name} must be a whole number >= {least}, got {value!r}")
    return value


@dataclass(frozen=True)
class Layout:
    """`data_parallel × tensor_parallel × pipeline_parallel` ranks (the world
    size). The model is cut into `tensor_parallel × pipeline_parallel` parts,
    each held by one replica group of `data_parallel` ranks; `replica_group`
    is this rank's, below `tensor_parallel × pipeline_parallel` (with a
    pipeline: stage × tensor_parallel + tensor-parallel rank). The service
    compares a rank's norm only with its group's: a pipeline stage reports
    the norm of its own layers, which differs from the other stages' by
    design."""

    data_parallel: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    replica_group: int = 0

    def __post_init__(self) -> None:
        _size("data_parallel", self.data_parallel, 1)
        _size("tensor_parallel", self.tensor_parallel, 1)
        _size("pipeline_parallel", self.pipeline_parallel, 1)
        groups = self.tensor_parallel * self.pipeline_parallel
        if _size("replica_group", self.replica_group, 0) >= groups:
            raise ValueError(
                f"layout: replica_group {self.replica_group} is not below "
                f"tensor_parallel {self.tensor_parallel} × pipeline_parallel {self.pipeline_parallel} = {groups}"
            )

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.tensor_parallel * self.pipeline_parallel

    def __str__(self) -> str:
        return (
            f"data_parallel {self.data_parallel} × tensor_parallel {self.tensor_parallel} × "
            f"pipeline_parallel {self.pipeline_parallel} = {self.world_size} ranks, replica_group {self.replica_group}"
        )

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh) -> Layout:
        """This rank's layout from the job's device mesh (spanning every
        rank) with named dimensions: "pp" is the pipeline, "tp" tensor
        parallelism, and the data-parallel ones ("dp", "dp_replicate",
        "dp_shard", "cp", ...) multiply into `data_parallel`."""
        names: tuple[str, ...] | None = mesh.mesh_dim_names
        if not names:
            raise ValueError(
                'layout: the DeviceMesh\'s dimensions have no names; name them (mesh_dim_names=("pp", "dp", "tp")) '
                "or pass gradguard.Layout"
            )
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            raise ValueError("layout: this rank is not in the DeviceMesh")
        pp, stage, tp, tp_rank, data = 1, 0, 1, 0, 1
        for dim, name in enumerate(names):  # DeviceMesh names are distinct
            size, at = int(mesh.size(dim)), coordinate[dim]
            if name == PIPELINE_DIM:
                pp, stage = size, at
            elif name == TENSOR_DIM:
                tp, tp_rank = size, at
            elif name in DATA_DIMS:
                data *= size
            else:
                known = ", ".join([PIPELINE_DIM, TENSOR_DIM, *sorted(DATA_DIMS)])
                raise ValueError(
                    f"layout: DeviceMesh dimension {name!r} is none gradguard knows ({known}); pass gradguard.Layout"
                )
        return cls(data, tp, pp, stage * tp + tp_rank)

    def to_proto(self) -> pb.Layout:
        from .v1 import gradguard_pb2 as pb

        return pb.Layout(
            data_parallel=self.data_parallel,
            tensor_parallel=self.tensor_parallel,
            pipeline_parallel=self.pipeline_parallel,
            replica_group=self.replica_group,
        )


def resolve_layout(layout: object, world_size: int) -> Layout | None:
    """The `layout` option as a `Layout` checked against the world size: a
    `Layout`, a `DeviceMesh` with named dimensions (`Layout.from_mesh`), or
    None (the service then compares every rank with every other)."""
    if layout is None:
        return None
    hint = ""
    if not isinstance(layout, Layout):
        if not _is_mesh(layout):
            raise ValueError(f"layout must be a gradguard.Layout or a DeviceMesh with named dimensions, got {layout!r}")
        layout = Layout.from_mesh(layout)
        hint = " (the DeviceMesh must span every rank)"
    if layout.world_size != world_size:
        raise ValueError(f"layout: {layout}, but world_size is {world_size}{hint}")
    return layout


def _is_mesh(value: object) -> TypeGuard[DeviceMesh]:
    return all(hasattr(value, a) for a in ("mesh_dim_names", "size", "get_coordinate"))
