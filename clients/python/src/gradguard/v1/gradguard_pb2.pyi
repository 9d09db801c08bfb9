from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_INFO: _ClassVar[Severity]
    SEVERITY_WARNING: _ClassVar[Severity]
    SEVERITY_CRITICAL: _ClassVar[Severity]

class Health(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_UNSPECIFIED: _ClassVar[Health]
    HEALTH_OK: _ClassVar[Health]
    HEALTH_INFO: _ClassVar[Health]
    HEALTH_WARNING: _ClassVar[Health]
    HEALTH_CRITICAL: _ClassVar[Health]
SEVERITY_UNSPECIFIED: Severity
SEVERITY_INFO: Severity
SEVERITY_WARNING: Severity
SEVERITY_CRITICAL: Severity
HEALTH_UNSPECIFIED: Health
HEALTH_OK: Health
HEALTH_INFO: Health
HEALTH_WARNING: Health
HEALTH_CRITICAL: Health

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "summary", "ack", "batch")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    summary: Summary
    ack: AdviceAck
    batch: SummaryBatch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ..., ack: _Optional[_Union[AdviceAck, _Mapping]] = ..., batch: _Optional[_Union[SummaryBatch, _Mapping]] = ...) -> None: ...

class SummaryBatch(_message.Message):
    __slots__ = ("summaries",)
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    summaries: _containers.RepeatedCompositeFieldContainer[Summary]
    def __init__(self, summaries: _Optional[_Iterable[_Union[Summary, _Mapping]]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("welcome", "advice", "progress")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    advice: Advice
    progress: Progress
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., advice: _Optional[_Union[Advice, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("job", "rank", "world_size", "layer_names", "client_version", "rule_profile", "report_progress", "layout")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYER_NAMES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULE_PROFILE_FIELD_NUMBER: _ClassVar[int]
    REPORT_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    layer_names: _containers.RepeatedScalarFieldContainer[str]
    client_version: str
    rule_profile: str
    report_progress: bool
    layout: Layout
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., layer_names: _Optional[_Iterable[str]] = ..., client_version: _Optional[str] = ..., rule_profile: _Optional[str] = ..., report_progress: _Optional[bool] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("data_parallel", "tensor_parallel", "pipeline_parallel", "replica_group")
    DATA_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    REPLICA_GROUP_FIELD_NUMBER: _ClassVar[int]
    data_parallel: int
    tensor_parallel: int
    pipeline_parallel: int
    replica_group: int
    def __init__(self, data_parallel: _Optional[int] = ..., tensor_parallel: _Optional[int] = ..., pipeline_parallel: _Optional[int] = ..., replica_group: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("server_version", "last_step", "reports_progress", "urgency")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    REPORTS_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    URGENCY_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    last_step: int
    reports_progress: bool
    urgency: UrgencyRules
    def __init__(self, server_version: _Optional[str] = ..., last_step: _Optional[int] = ..., reports_progress: _Optional[bool] = ..., urgency: _Optional[_Union[UrgencyRules, _Mapping]] = ...) -> None: ...

class UrgencyRules(_message.Message):
    __slots__ = ("grad_spike_enabled", "grad_alpha", "grad_warmup", "grad_z", "grad_severe_z", "grad_min_clip_ratio", "loss_spike_enabled", "loss_min_rise", "loss_warmup")
    GRAD_SPIKE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    GRAD_ALPHA_FIELD_NUMBER: _ClassVar[int]
    GRAD_WARMUP_FIELD_NUMBER: _ClassVar[int]
    GRAD_Z_FIELD_NUMBER: _ClassVar[int]
    GRAD_SEVERE_Z_FIELD_NUMBER: _ClassVar[int]
    GRAD_MIN_CLIP_RATIO_FIELD_NUMBER: _ClassVar[int]
    LOSS_SPIKE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    LOSS_MIN_RISE_FIELD_NUMBER: _ClassVar[int]
    LOSS_WARMUP_FIELD_NUMBER: _ClassVar[int]
    grad_spike_enabled: bool
    grad_alpha: float
    grad_warmup: int
    grad_z: float
    grad_severe_z: float
    grad_min_clip_ratio: float
    loss_spike_enabled: bool
    loss_min_rise: float
    loss_warmup: int
    def __init__(self, grad_spike_enabled: _Optional[bool] = ..., grad_alpha: _Optional[float] = ..., grad_warmup: _Optional[int] = ..., grad_z: _Optional[float] = ..., grad_severe_z: _Optional[float] = ..., grad_min_clip_ratio: _Optional[float] = ..., loss_spike_enabled: _Optional[bool] = ..., loss_min_rise: _Optional[float] = ..., loss_warmup: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("step", "time", "loss", "lr", "loss_scale", "grad_norm", "layer_l2", "layer_max_abs", "layer_nonfinite", "layer_param_norm", "layer_update_norm")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LAYER_L2_FIELD_NUMBER: _ClassVar[int]
    LAYER_MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    LAYER_NONFINITE_FIELD_NUMBER: _ClassVar[int]
    LAYER_PARAM_NORM_FIELD_NUMBER: _ClassVar[int]
    LAYER_UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    step: int
    time: float
    loss: float
    lr: float
    loss_scale: float
    grad_norm: float
    layer_l2: _containers.RepeatedScalarFieldContainer[float]
    layer_max_abs: _containers.RepeatedScalarFieldContainer[float]
    layer_nonfinite: _containers.RepeatedScalarFieldContainer[int]
    layer_param_norm: _containers.RepeatedScalarFieldContainer[float]
    layer_update_norm: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, step: _Optional[int] = ..., time: _Optional[float] = ..., loss: _Optional[float] = ..., lr: _Optional[float] = ..., loss_scale: _Optional[float] = ..., grad_norm: _Optional[float] = ..., layer_l2: _Optional[_Iterable[float]] = ..., layer_max_abs: _Optional[_Iterable[float]] = ..., layer_nonfinite: _Optional[_Iterable[int]] = ..., layer_param_norm: _Optional[_Iterable[float]] = ..., layer_update_norm: _Optional[_Iterable[float]] = ...) -> None: ...

class AdviceAck(_message.Message):
    __slots__ = ("advice_id", "applied_step", "applied", "note")
    ADVICE_ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    advice_id: int
    applied_step: int
    applied: bool
    note: str
    def __init__(self, advice_id: _Optional[int] = ..., applied_step: _Optional[int] = ..., applied: _Optional[bool] = ..., note: _Optional[str] = ...) -> None: ...

class ClipGradients(_message.Message):
    __slots__ = ("max_norm",)
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    max_norm: float
    def __init__(self, max_norm: _Optional[float] = ...) -> None: ...

class ScaleLr(_message.Message):
    __slots__ = ("factor",)
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    factor: float
    def __init__(self, factor: _Optional[float] = ...) -> None: ...

class SkipStep(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScaleLossScale(_message.Message):
    __slots__ = ("factor",)
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    factor: float
    def __init__(self, factor: _Optional[float] = ...) -> None: ...

class Rollback(_message.Message):
    __slots__ = ("to_step",)
    TO_STEP_FIELD_NUMBER: _ClassVar[int]
    to_step: int
    def __init__(self, to_step: _Optional[int] = ...) -> None: ...

class InspectWorker(_message.Message):
    __slots__ = ("rank",)
    RANK_FIELD_NUMBER: _ClassVar[int]
    rank: int
    def __init__(self, rank: _Optional[int] = ...) -> None: ...

class Halt(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class Advice(_message.Message):
    __slots__ = ("id", "job", "target_rank", "decided_at_step", "apply_from_step", "clip_gradients", "scale_lr", "skip_step", "scale_loss_scale", "rollback", "inspect_worker", "halt", "severity", "rules", "reason", "evidence")
    ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    TARGET_RANK_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    APPLY_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    SCALE_LR_FIELD_NUMBER: _ClassVar[int]
    SKIP_STEP_FIELD_NUMBER: _ClassVar[int]
    SCALE_LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    INSPECT_WORKER_FIELD_NUMBER: _ClassVar[int]
    HALT_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    id: int
    job: str
    target_rank: int
    decided_at_step: int
    apply_from_step: int
    clip_gradients: ClipGradients
    scale_lr: ScaleLr
    skip_step: SkipStep
    scale_loss_scale: ScaleLossScale
    rollback: Rollback
    inspect_worker: InspectWorker
    halt: Halt
    severity: Severity
    rules: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    evidence: _containers.RepeatedCompositeFieldContainer[Evidence]
    def __init__(self, id: _Optional[int] = ..., job: _Optional[str] = ..., target_rank: _Optional[int] = ..., decided_at_step: _Optional[int] = ..., apply_from_step: _Optional[int] = ..., clip_gradients: _Optional[_Union[ClipGradients, _Mapping]] = ..., scale_lr: _Optional[_Union[ScaleLr, _Mapping]] = ..., skip_step: _Optional[_Union[SkipStep, _Mapping]] = ..., scale_loss_scale: _Optional[_Union[ScaleLossScale, _Mapping]] = ..., rollback: _Optional[_Union[Rollback, _Mapping]] = ..., inspect_worker: _Optional[_Union[InspectWorker, _Mapping]] = ..., halt: _Optional[_Union[Halt, _Mapping]] = ..., severity: _Optional[_Union[Severity, str]] = ..., rules: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., evidence: _Optional[_Iterable[_Union[Evidence, _Mapping]]] = ...) -> None: ...

class Anomaly(_message.Message):
    __slots__ = ("id", "job", "rank", "step", "time", "rule", "severity", "layer", "value", "threshold", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    job: str
    rank: int
    step: int
    time: float
    rule: str
    severity: Severity
    layer: str
    value: float
    threshold: float
    message: str
    def __init__(self, id: _Optional[int] = ..., job: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., time: _Optional[float] = ..., rule: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., layer: _Optional[str] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job", "first_seen", "last_seen", "ranks", "world_size", "layers", "last_step", "health", "live", "connected_streams", "anomalies_info", "anomalies_warning", "anomalies_critical", "advice")
    JOB_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_STREAMS_FIELD_NUMBER: _ClassVar[int]
    ANOMALIES_INFO_FIELD_NUMBER: _ClassVar[int]
    ANOMALIES_WARNING_FIELD_NUMBER: _ClassVar[int]
    ANOMALIES_CRITICAL_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    job: str
    first_seen: float
    last_seen: float
    ranks: int
    world_size: int
    layers: int
    last_step: int
    health: Health
    live: bool
    connected_streams: int
    anomalies_info: int
    anomalies_warning: int
    anomalies_critical: int
    advice: int
    def __init__(self, job: _Optional[str] = ..., first_seen: _Optional[float] = ..., last_seen: _Optional[float] = ..., ranks: _Optional[int] = ..., world_size: _Optional[int] = ..., layers: _Optional[int] = ..., last_step: _Optional[int] = ..., health: _Optional[_Union[Health, str]] = ..., live: _Optional[bool] = ..., connected_streams: _Optional[int] = ..., anomalies_info: _Optional[int] = ..., anomalies_warning: _Optional[int] = ..., anomalies_critical: _Optional[int] = ..., advice: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("job", "rule", "min_severity", "worker", "step_from", "step_to", "time_from", "time_to")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    MIN_SEVERITY_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FROM_FIELD_NUMBER: _ClassVar[int]
    STEP_TO_FIELD_NUMBER: _ClassVar[int]
    TIME_FROM_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIELD_NUMBER: _ClassVar[int]
    job: str
    rule: str
    min_severity: Severity
    worker: int
    step_from: int
    step_to: int
    time_from: float
    time_to: float
    def __init__(self, job: _Optional[str] = ..., rule: _Optional[str] = ..., min_severity: _Optional[_Union[Severity, str]] = ..., worker: _Optional[int] = ..., step_from: _Optional[int] = ..., step_to: _Optional[int] = ..., time_from: _Optional[float] = ..., time_to: _Optional[float] = ...) -> None: ...

class ListAnomaliesRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: Filter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[Filter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAnomaliesResponse(_message.Message):
    __slots__ = ("anomalies", "next_page_token")
    ANOMALIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    anomalies: _containers.RepeatedCompositeFieldContainer[Anomaly]
    next_page_token: str
    def __init__(self, anomalies: _Optional[_Iterable[_Union[Anomaly, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StoredAdvice(_message.Message):
    __slots__ = ("advice", "time", "applied", "declined")
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    advice: Advice
    time: float
    applied: int
    declined: int
    def __init__(self, advice: _Optional[_Union[Advice, _Mapping]] = ..., time: _Optional[float] = ..., applied: _Optional[int] = ..., declined: _Optional[int] = ...) -> None: ...

class ListAdviceRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: Filter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[Filter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdviceResponse(_message.Message):
    __slots__ = ("advice", "next_page_token")
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    advice: _containers.RepeatedCompositeFieldContainer[StoredAdvice]
    next_page_token: str
    def __init__(self, advice: _Optional[_Iterable[_Union[StoredAdvice, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchAnomaliesRequest(_message.Message):
    __slots__ = ("job", "min_severity")
    JOB_FIELD_NUMBER: _ClassVar[int]
    MIN_SEVERITY_FIELD_NUMBER: _ClassVar[int]
    job: str
    min_severity: Severity
    def __init__(self, job: _Optional[str] = ..., min_severity: _Optional[_Union[Severity, str]] = ...) -> None: ...

class GetRulesRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class Rules(_message.Message):
    __slots__ = ("job", "toml")
    JOB_FIELD_NUMBER: _ClassVar[int]
    TOML_FIELD_NUMBER: _ClassVar[int]
    job: str
    toml: str
    def __init__(self, job: _Optional[str] = ..., toml: _Optional[str] = ...) -> None: ...
