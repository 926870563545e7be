"""The FastAPI application: `uvicorn api.main:app`."""

from __future__ import annotations

import logging
import re
import threading
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from api import analysis
from api.routes import candidates, health, jobs, leaderboard
from api.security import KeyGate
from api.services import errors
from api.services.errors import ServiceError
from store.auth import KEY_PREFIX
from store.db import migrate
from store.settings import get_settings

log = logging.getLogger("bitsearch.api")

_KEY = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_\-%.~]*")


def redact(text: str) -> str:
    return _KEY.sub(KEY_PREFIX + "<redacted>", text)


class RedactKeys(logging.Filter):
    """No log line may hold an API key: an old link with ?key=... puts one in the access log's request line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def _redact_logs() -> None:
    for name in ("uvicorn", "uvicorn.access", "uvicorn.error", "bitsearch.api", "fastapi"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeys) for f in logger.filters):
            logger.addFilter(RedactKeys())


class RequestGuard:
    """The outermost layer: every response carries an `X-Request-ID`; an unhandled error is answered with a generic
    500 naming that id (the 500 handler below) and logged once, with the id, here or there; nothing of it reaches
    the client."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if not scope["state"].get("error_logged"):
                log.exception("request %s (%s %s) failed", rid, scope.get("method"), redact(scope.get("path", "")))
            if not started:
                await send_with_id(
                    {"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]}
                )
                await send_with_id({"type": "http.response.body", "body": _internal_error(rid)})


def _internal_error(rid: str) -> bytes:
    return (
        f'{{"detail": "internal server error; quote request id {rid} when reporting it", "request_id": "{rid}"}}'
    ).encode()


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
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


@asynccontextmanager
async def _lifespan(_app):
    # The fork server imports torch and loads a small model once, and every submission builds a typed job spec
    # (search.spec, which imports torch): both started now, so the first request does not wait for them.
    threading.Thread(target=_warm, name="bitsearch-warm", daemon=True).start()
    yield


def _warm() -> None:
    import search.spec  # noqa: F401

    analysis.warm()


# The one place a service refusal becomes an HTTP status.
ERROR_STATUS: dict[type[ServiceError], int] = {
    errors.InvalidRequest: 400,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.CannotRun: 422,
    errors.QuotaExceeded: 429,
    errors.Busy: 503,
    errors.StorageFull: 507,
}


def create_app() -> FastAPI:
    settings = get_settings()
    migrate(settings.resolved_database_url())
    app = FastAPI(
        lifespan=_lifespan,
        # Served by _docs below: FastAPI's own pages load Swagger UI and ReDoc from a CDN, blank offline.
        docs_url=None,
        redoc_url=None,
        title="bitsearch",
        version="0.1.0",
        description="Per-layer bit-width search for PyTorch models. POST a torch.export .pt2, data and a budget to "
        "/jobs; poll the job; download the configs; compare on /leaderboard.",
    )
    for module in (jobs, candidates, leaderboard, health):
        app.include_router(module.router)
    _docs(app)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        # One readable line naming each bad field, instead of pydantic's nested structure only.
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse(status_code=422, content={"detail": problems, "errors": jsonable(exc.errors())})

    @app.exception_handler(ServiceError)
    async def _refused(_request: Request, exc: ServiceError):
        return JSONResponse(
            status_code=ERROR_STATUS[type(exc)], content={"detail": exc.message}, headers=exc.headers or None
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        rid = request.scope.get("state", {}).get("request_id", "-")
        log.error("request %s (%s %s) failed", rid, request.method, redact(request.url.path), exc_info=exc)
        request.scope.setdefault("state", {})["error_logged"] = True
        return Response(_internal_error(rid), status_code=500, media_type="application/json")

    @app.get("/", include_in_schema=False)
    def _root():
        return RedirectResponse("/leaderboard")

    # Added last, so outermost: the key is checked before the body limit counts (or anything reads) the body.
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(KeyGate)
    _redact_logs()
    return app


DOCS_ASSETS = "/static/docs"
# The bundles can still name outside addresses (ReDoc's sidebar logo comes from its CDN); this policy keeps the
# browser on this server, so the pages neither wait on nor report to anyone else.
DOCS_POLICY = {"Content-Security-Policy": "default-src 'self' 'unsafe-inline' data: blob:"}


def _docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from the copies of their scripts in the fastapi-offline package, so that
    the documentation works on a machine without internet."""
    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")
    favicon = f"{DOCS_ASSETS}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    def _swagger(request: Request):
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=root + app.openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + "/docs/oauth2-redirect",
            swagger_js_url=root + f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=root + f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=root + favicon,
            # Swagger UI's default sends the schema's address to validator.swagger.io for a badge.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers.update(DOCS_POLICY)
        return page

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def _swagger_redirect():
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def _redoc(request: Request):
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=root + app.openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=root + f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=root + favicon,
            with_google_fonts=False,
        )
        page.headers.update(DOCS_POLICY)
        return page


def jsonable(errors) -> list:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(errors, custom_encoder={Exception: str})


fastapi_app = create_app()
app = RequestGuard(fastapi_app)
