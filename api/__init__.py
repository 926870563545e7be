"""The HTTP API (FastAPI): routes are thin; they validate input, write the database and queue work."""
