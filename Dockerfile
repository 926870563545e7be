# One image for the API and the worker (compose picks the command).
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# The CPU build of torch first and pinned, so nothing later resolves a CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY search search
COPY kernels kernels
COPY cli cli
COPY api api
COPY worker worker
COPY store store
COPY models models
COPY alembic.ini ./
RUN pip install --no-cache-dir .
ENV BITSEARCH_VAR_DIR=/var/bitsearch
EXPOSE 8000
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
