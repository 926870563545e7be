"""Every setting of the service, in one place; each can be set by a BITSEARCH_* environment variable.

The defaults are the embedded setup `make run` uses: SQLite (WAL) for the database, kombu's SQLAlchemy
transport on a second SQLite file as the Celery broker, artifacts under ./var. Production sets
BITSEARCH_DATABASE_URL=postgresql+psycopg://... and BITSEARCH_BROKER_URL=redis://...
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BITSEARCH_", extra="ignore")

    var_dir: Path = Field(default=Path("var"), description="root of the embedded defaults' files")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty means SQLite in var_dir")
    broker_url: str = Field(default="", description="Celery broker URL; empty means SQLite (kombu sqla) in var_dir")
    artifact_dir: Path | None = Field(default=None, description="uploaded models, data sets, packed models")
    queue: str = Field(default="bitsearch", description="Celery queue of the searches (tests use their own)")
    validation_queue: str = Field(
        default="",
        description="Celery queue of the validations, so a search never waits behind them; "
        "empty: the search queue's name + '-validate'",
    )

    max_model_bytes: int = 256 * MiB
    max_dataset_bytes: int = 2047 * MiB  # under 2**31: datasets.size_bytes is a 32-bit column
    max_request_bytes: int = 2367 * MiB  # a model and a data set at their limits, and room for the form
    max_layers: int = 4096
    # Measured: the child starts at about 0.75 GB of address space (torch loaded); a 256 MiB model peaks at 1.3 GB;
    # a data set is checked from its header, labels and normalisation (float32 inputs scanned in 32 MiB chunks), so
    # a 1 GiB one (float32 or uint8) is analysed within 1 GB (bench/upload.py).
    upload_analysis_memory_mb: int = Field(
        default=3072,
        description="address-space limit (RLIMIT_AS) of the child "
        "process that analyses one upload; over it the upload gets a 413",
    )
    upload_analysis_time_s: float = Field(
        default=120.0, gt=0, description="an upload's analysis is killed after this long (422)"
    )
    upload_analysis_concurrency: int = Field(default=2, ge=1, description="uploads analysed at once; more wait")

    task_time_limit_s: int = Field(default=6 * 3600, description="hard limit per search task")
    validate_time_limit_s: int = Field(default=1800, description="hard limit per validation task")
    job_memory_mb: int = Field(
        default=12288,
        ge=256,
        description="a job whose expected peak memory (search/memory.py) is over this is refused at submission; "
        "set it to what one worker process may use",
    )
    worker_max_memory_mb: int = Field(default=16384, description="a worker child over this is replaced after its task")
    heartbeat_s: float = Field(default=5.0, description="how often a running job proves its worker is alive")
    stale_after_s: float = Field(default=60.0, description="a running job without a heartbeat this long is orphaned")
    max_attempts: int = Field(default=3, description="runs of a job before it is failed as lost")
    validate_top_k: int = Field(default=4, description="default number of Pareto candidates validated per job")
    validate_samples: int = Field(default=10000, description="test images a validation runs on the kernels")
    validate_gmacs: float = Field(
        default=1000.0,
        gt=0,
        description="a validation runs at most this many billion multiply-accumulates of the model per pass "
        "(fewer images for a big model: ResNet-18 at 224 px gets 549, ResNet-20 at 28 px all 10,000)",
    )
    threads: int = Field(default=0, description="torch threads per task; 0 = torch's default")
    spread: bool = Field(
        default=True,
        description="offer a search's measurement chunks to every worker on the search queue (else the search's "
        "own worker computes them all); finished chunks are reused either way",
    )

    rate_limit_per_s: float = Field(default=100.0, description="requests per second per API key (or client address)")
    rate_limit_burst: int = Field(default=200, description="requests a key may send at once before the rate applies")
    auth_failures_per_s: float = Field(
        default=1.0,
        gt=0,
        description="requests with an invalid API key per second "
        "per client address, once the burst is spent (429 beyond)",
    )
    auth_failures_burst: int = Field(default=20, ge=1, description="invalid-key requests an address may send at once")
    max_active_jobs: int = Field(default=4, description="queued + running jobs per owner")
    max_finetune_images: int = Field(
        default=240_000,
        description="training images one fine-tune may run through "
        "(epochs x samples, or steps x batch size); the thesis's 4 epochs of 60k fit",
    )
    key_cache_s: float = Field(default=30.0, description="how long a key lookup is cached (revocation delay)")

    def validation_samples_for(self, model_macs: int) -> int:
        """Test images a validation of this model runs: validate_samples, fewer where that would take minutes."""
        by_compute = int(self.validate_gmacs * 1e9 // max(1, model_macs))
        return max(1, min(self.validate_samples, max(256, by_compute)))

    def resolved_validation_queue(self) -> str:
        return self.validation_queue or f"{self.queue}-validate"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'bitsearch.db').resolve()}"

    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.var_dir / 'broker.db').resolve()}"

    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.var_dir / "artifacts").resolve()


@lru_cache
def get_settings() -> Settings:
    settings = Settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    return settings
