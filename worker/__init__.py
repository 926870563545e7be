"""Celery workers: run searches, validate candidates on the compiled kernels, recover orphaned jobs."""
