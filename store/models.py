"""The database tables. Uploads are content-addressed (sha256 ids), so one model or data set serves many jobs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class ModelRecord(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the .pt2 archive
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_layers: Mapped[int] = mapped_column(Integer)
    total_params: Mapped[int] = mapped_column(Integer)
    input_shape: Mapped[list] = mapped_column(JSON)  # per sample, without the batch dimension
    num_outputs: Mapped[int] = mapped_column(Integer)  # classes, when the output is [N, classes] logits
    # What the upload's analysis found (layers, unquantized bytes): a later job's feasibility check reads this
    # instead of loading the model in the API. None for rows from before it was kept.
    analysis: Mapped[dict | None] = mapped_column(JSON, nullable=True, deferred=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DatasetRecord(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the file, or a built-in's name
    name: Mapped[str] = mapped_column(String(255))
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    num_samples: Mapped[int] = mapped_column(Integer)
    sample_shape: Mapped[list] = mapped_column(JSON)
    num_classes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATES = (JobStatus.QUEUED, JobStatus.RUNNING)  # what counts against an owner's active-job limit
FINAL_STATES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    method: Mapped[str] = mapped_column(String(32), index=True)
    budget: Mapped[dict] = mapped_column(JSON)
    options: Mapped[dict] = mapped_column(JSON)
    validate_top_k: Mapped[int] = mapped_column(Integer, default=4)

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value, index=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str] = mapped_column(String(64), default="queued")
    best_val_top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    memory_estimate: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # search.memory, at submission
    # Seconds per phase ({"phases": {...}}) and each measurement pass's chunks, computed or reused (at the end).
    timings: Mapped[dict | None] = mapped_column(JSON, nullable=True, deferred=True)
    # Per-layer damage at each width and the widths chosen, where the method measures it (search/searches/sqnr.py).
    sensitivity: Mapped[dict | None] = mapped_column(JSON, nullable=True, deferred=True)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    search_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)

    # Crash recovery: the worker running the job refreshes heartbeat_at; a stale heartbeat means it died.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    # Access control: only the owner's keys see the job and its candidates, unless the owner made it public.
    owner: Mapped[str] = mapped_column(String(64), default="local", index=True)
    public: Mapped[bool] = mapped_column(Boolean, default=False)

    model: Mapped[ModelRecord] = relationship()
    dataset: Mapped[DatasetRecord] = relationship()
    candidates: Mapped[list[CandidateRecord]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="CandidateRecord.seq"
    )


class CandidateRecord(Base):
    __tablename__ = "candidates"
    # (job_id, seq) is unique: a retried job cannot store the same candidate twice.
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_candidate_job_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict] = mapped_column(JSON)
    avg_wbits: Mapped[float] = mapped_column(Float)
    weight_bytes: Mapped[int] = mapped_column(Integer)
    bitops: Mapped[float] = mapped_column(Float)  # can exceed 2^63 for big models
    act_bytes: Mapped[int] = mapped_column(Integer)
    latency_us: Mapped[float | None] = mapped_column(Float, nullable=True)
    score: Mapped[float] = mapped_column(Float)
    val_top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_sqnr_db: Mapped[float | None] = mapped_column(Float, nullable=True)
    pareto: Mapped[bool] = mapped_column(Boolean, default=False)
    recommended: Mapped[bool] = mapped_column(Boolean, default=False)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="candidates")
    validation: Mapped[ValidationRecord | None] = relationship(
        back_populates="candidate", uselist=False, cascade="all, delete-orphan"
    )


class ValidationStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ValidationRecord(Base):
    """A candidate run on the compiled low-bit kernels: measured accuracy, size and latency."""

    __tablename__ = "validations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=ValidationStatus.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # claims so far
    top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    sim_top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    agreement: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_logit_diff: Mapped[float | None] = mapped_column(Float, nullable=True)
    samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    packed_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_us: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {"1": us, "64": us}, medians
    latency_iqr_us: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {"1": us, "64": us}, spreads
    # {"others_cpu_share": 0.02, "under_load": false, "timings": 1, "repeats": 20}: how busy the machine was
    latency_conditions: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    threads: Mapped[int | None] = mapped_column(Integer, nullable=True)
    isa: Mapped[str | None] = mapped_column(String(32), nullable=True)
    packed_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    candidate: Mapped[CandidateRecord] = relationship(back_populates="validation")


class LatencyTableRecord(Base):
    """Per-layer kernel latencies of a model measured on one machine (the latency budget's source)."""

    __tablename__ = "latency_tables"
    __table_args__ = (UniqueConstraint("model_id", "machine", name="uq_latency_model_machine"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    machine: Mapped[str] = mapped_column(String(255))
    table: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MeasurementRecord(Base):
    """A measurement pass (search/measurement.py), under the sha256 of everything that decides its sums.
    Jobs with the same key share it; its chunks are computed once, by whichever worker claims each."""

    __tablename__ = "measurements"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(64), index=True)
    spec: Mapped[dict] = mapped_column(JSON)  # DamagePass.to_json()
    chunks: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(String(32))  # the job that first asked for it: where workers load from
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ChunkStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"


class MeasurementChunk(Base):
    """One chunk of a pass: claimed by one worker at a time (a conditional UPDATE), its result kept when done."""

    __tablename__ = "measurement_chunks"
    __table_args__ = (UniqueConstraint("measurement_key", "index", name="uq_measurement_chunk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    measurement_key: Mapped[str] = mapped_column(ForeignKey("measurements.key", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=ChunkStatus.PENDING.value)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    runs: Mapped[int] = mapped_column(Integer, default=0)  # times a worker started it
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)


class WorkerRecord(Base):
    """Workers announce themselves here (broker-independent: kombu's SQL transport has no broadcast)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key of an owner. Only its sha256 is stored: keys are 32 random bytes, so a plain hash is enough
    (no dictionary to guess from), and a leaked database reveals no usable key."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))  # shown in listings so a key can be recognised
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Ownership(Base):
    """Who uploaded which model or data set: uploads are stored once, but each owner sees only their own."""

    __tablename__ = "ownerships"
    __table_args__ = (UniqueConstraint("owner", "kind", "object_id", name="uq_ownership"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "model" | "dataset"
    object_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
