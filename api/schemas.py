"""Request and response bodies of the API (separate from the database models in store/)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer


def _utc_iso(t: datetime) -> str:
    # SQLite hands back naive datetimes and PostgreSQL aware ones; everything stored is UTC, and every response
    # says so the same way.
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.isoformat().replace("+00:00", "Z")


UtcTime = Annotated[datetime, PlainSerializer(_utc_iso, return_type=str)]


class Progress(BaseModel):
    step: int
    total: int
    phase: str
    best_val_top1: float | None


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: str
    method: str
    model_id: str
    dataset_id: str
    budget: dict[str, float]
    budgets: list[dict[str, float]] = Field(
        default_factory=list,
        description="every budget the job runs at: `budget` (index 0), then its sweep's (options.sweep), in order; "
        "a candidate's meta.budget is the index of the budget it was found under",
    )
    options: dict[str, Any]
    validate_top_k: int
    progress: Progress
    error: str | None
    created_at: UtcTime
    started_at: UtcTime | None
    finished_at: UtcTime | None
    search_seconds: float | None
    attempts: int
    cancel_requested: bool
    public: bool = Field(description="listed on everyone's leaderboard and readable by anyone")
    candidates: int = 0
    notes: list[str] = Field(
        default_factory=list, description="what the user should know about how this job runs (e.g. the model's batch)"
    )
    expected_memory_mb: int | None = Field(
        default=None, description="the peak memory the job is expected to need, estimated at submission"
    )
    links: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, Any] | None = Field(
        default=None,
        description='written when the search ends: seconds per phase ({"phases": {...}}) and each measurement '
        'pass, its chunks computed or reused ({"measurement": [...]}); null before',
    )


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class JobCreated(BaseModel):
    id: str
    status: str
    model_id: str
    dataset_id: str
    location: str


class ValidationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    status: str
    top1: float | None = None
    sim_top1: float | None = None
    agreement: float | None = None
    max_logit_diff: float | None = None
    samples: int | None = None
    packed_bytes: int | None = None
    latency_us: dict[str, float] | None = Field(default=None, description="batch size -> median microseconds")
    latency_iqr_us: dict[str, float] | None = Field(default=None, description="batch size -> interquartile range")
    latency_conditions: dict[str, Any] | None = Field(
        default=None,
        description="others_cpu_share (other processes' share of the CPU while timing), under_load, "
        "timings (tries to find a quiet moment), repeats",
    )
    threads: int | None = None
    isa: str | None = None
    error: str | None = None


class CandidateOut(BaseModel):
    id: int
    job_id: str
    seq: int
    avg_wbits: float
    weight_bytes: int
    bitops: float
    act_bytes: int
    latency_us: float | None
    score: float
    val_top1: float | None
    val_sqnr_db: float | None
    pareto: bool
    recommended: bool
    validation: ValidationOut | None = Field(description="null: no validation record (not selected, or not queued yet)")
    w_bits: dict[str, int] | None = None
    a_bits: dict[str, int] | None = None
    budget: int | None = Field(
        default=None, description="a budget sweep's candidate: the index of the job's budget it was found under"
    )
    recommended_for: list[int] = Field(
        default_factory=list,
        description="a budget sweep: the indexes of the job's budgets (JobOut.budgets) it is the recommendation of",
    )


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    size_bytes: int
    num_layers: int
    total_params: int
    input_shape: list[int]
    num_outputs: int


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    builtin: bool
    num_samples: int
    sample_shape: list[int]
    num_classes: int | None


class LeaderboardRow(BaseModel):
    candidate_id: int
    job_id: str
    method: str
    accuracy: float | None = Field(description="measured top-1 on the kernels when validated, else simulated")
    validated: bool
    validation_status: str = Field(
        description="the validation's status (queued, running, succeeded, failed); "
        "without a record: pending, not selected, or not validated"
    )
    sim_val_top1: float | None
    agreement: float | None
    weight_bytes: int
    packed_bytes: int | None
    avg_wbits: float
    bitops: float
    latency_us_batch1: float | None
    latency_us_batch64: float | None
    latency_iqr_us_batch1: float | None = None
    latency_iqr_us_batch64: float | None = None
    latency_under_load: bool | None = Field(default=None, description="timed while other processes were busy")
    search_seconds: float | None
    front: bool = Field(description="on the accuracy-vs-size Pareto front of this model and data set")
    job_budgets: int = Field(default=1, description="how many budgets the job ran at (more than 1: a budget sweep)")
    budget_index: int | None = Field(
        default=None, description="a swept job's candidate: the index of the budget it was found under (0: main)"
    )
    budget: dict[str, float] | None = Field(default=None, description="a swept job's candidate: that budget's limits")
    recommended_for: list[int] = Field(
        default_factory=list, description="the indexes of the job's budgets this candidate is the recommendation of"
    )


class LeaderboardGroup(BaseModel):
    model: ModelOut
    dataset: DatasetOut
    rows: list[LeaderboardRow]


class Leaderboard(BaseModel):
    groups: list[LeaderboardGroup]


class Health(BaseModel):
    status: str
    database: str
    broker: str
    workers: list[str]
