"""The FastAPI application: `uvicorn api.main:app`."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse

from api import analysis
from api.routes import candidates, health, jobs, leaderboard
from api.security import KeyGate
from store.db import migrate
from store.settings import get_settings


class BodyLimit:
    """Refuses request bodies over the limit (413) before they are read: Content-Length first, then a
    running count for chunked bodies, so no upload can fill the disk by lying about its size."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = f'{{"detail": "request body is over the limit of {self.max_bytes} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


@asynccontextmanager
async def _lifespan(_app):
    # The fork server imports torch and loads a small model once; started now, the first upload does not wait.
    threading.Thread(target=analysis.warm, name="bitsearch-analysis-warm", daemon=True).start()
    yield


def create_app() -> FastAPI:
    settings = get_settings()
    migrate(settings.resolved_database_url())
    app = FastAPI(
        lifespan=_lifespan,
        title="bitsearch",
        version="0.1.0",
        description="Per-layer bit-width search for PyTorch models. POST a torch.export .pt2, data and a budget to "
                    "/jobs; poll the job; download the configs; compare on /leaderboard.",
    )
    for module in (jobs, candidates, leaderboard, health):
        app.include_router(module.router)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        # One readable line naming each bad field, instead of pydantic's nested structure only.
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse(status_code=422, content={"detail": problems, "errors": jsonable(exc.errors())})

    @app.get("/", include_in_schema=False)
    def _root():
        return RedirectResponse("/leaderboard")

    # Added last, so outermost: the key is checked before the body limit counts (or anything reads) the body.
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(KeyGate)
    return app


def jsonable(errors) -> list:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(errors, custom_encoder={Exception: str})


app = create_app()
