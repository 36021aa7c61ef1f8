"""The FastAPI application: JSON API under ``/api``, the playground page at ``/``, OpenAPI at ``/openapi.json``.

    >>> state = ServerState(lmedit.load_model("gemma3-270m"))
    >>> app = create_app(state)                       # loopback, no token
    >>> uvicorn.run(app, host="127.0.0.1", port=7860)

Security: ``resolve_token`` refuses a non-loopback host without a token; with a token every state-changing
request (edit, undo, reset, patch upload) must send ``Authorization: Bearer TOKEN`` (or ``X-Lmedit-Token``).
Bodies are capped before they are read (``Content-Length``), JSON endpoints need ``application/json`` (so a
cross-site form post cannot reach them) and uploads are streamed to disk with a byte cap.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from lmedit.errors import ConfigError, LmeditError
from lmedit.serve.state import EditSpec, Job, ServeError, ServerState, error_info, read_patch_zip

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
UPLOAD_PATH = "/api/patches"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
#: How long ``"wait": true`` blocks before answering 202 with the job to poll.
WAIT_LIMIT_S = 900.0

Text = Annotated[str, StringConstraints(min_length=1, max_length=2000)]
Short = Annotated[str, StringConstraints(min_length=1, max_length=200)]
HPValue = StrictBool | StrictInt | StrictFloat | Short | list[StrictInt | StrictFloat] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateBody(_Body):
    prompt: Text = Field(description="Text to continue.")
    max_new_tokens: int = Field(20, ge=1, le=64, description="Greedy tokens to generate.")


class ScoreBody(_Body):
    prompt: Text
    targets: list[Short] = Field(min_length=1, max_length=16, description="Continuations to score.")


class EditBody(_Body):
    prompt: Text = Field(description="Edit prompt containing the subject (or '{}' where it goes).")
    subject: Short
    target_new: Short = Field(description="New answer, e.g. ' Rome'.")
    target_true: Short | None = Field(None, description="Current answer (optional; adds P(target_true)).")
    paraphrases: list[Text] = Field(default_factory=list, max_length=8)
    unrelated: list[Text] = Field(default_factory=list, max_length=8)
    method: Short = Field("ft-m", description="A name from GET /api/info 'methods'.")
    hparams: dict[Short, HPValue] = Field(
        default_factory=dict, max_length=32, description="Overrides of the method's hyperparameters."
    )
    max_new_tokens: int = Field(12, ge=1, le=64, description="Tokens generated for before/after.")
    wait: bool = Field(False, description="Answer when the edit has finished instead of 202 + job id.")


class UndoBody(_Body):
    edit_id: int = Field(ge=1, description="Id from GET /api/history; later edits are re-applied.")
    rebase: bool = Field(
        False, description="Re-apply later edits that touch the same weights onto the new base."
    )
    wait: bool = False


class ResetBody(_Body):
    wait: bool = False


class TraceBody(_Body):
    prompt: Text = Field(description="Prompt containing the subject.")
    subject: Short = Field(description="The span whose embeddings are corrupted.")
    kind: Literal["hidden", "mlp", "attn"] = Field("mlp", description="Which states are restored.")
    samples: int = Field(3, ge=1, le=10, description="Noise samples per cell (cost grows linearly).")
    answer: Short | None = Field(None, description="Answer to trace; default: the model's top next token.")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None = None) -> str | None:
    """The token to enforce: ``token`` or ``$LMEDIT_TOKEN``; a non-loopback ``host`` without one is refused."""
    token = token or os.environ.get("LMEDIT_TOKEN") or None
    if token is not None and len(token) < 8:
        raise ConfigError(
            "token: use at least 8 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')"
        )
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"host: binding to {host!r} (not a loopback address) requires a token: pass --token T or set "
            "LMEDIT_TOKEN; every state-changing request must then send 'Authorization: Bearer T'"
        )
    return token


def _error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, **extra}}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuse bodies by their declared size before reading them; JSON endpoints need JSON.

    JSON endpoints need ``Content-Length`` (at most ``max_json``) and ``Content-Type: application/json``; the
    upload endpoint needs a zip content type and a ``Content-Length`` of at most ``max_upload`` when one is
    sent (chunked uploads are capped while streaming by the endpoint).
    """

    def __init__(self, app: Any, max_json: int, max_upload: int):
        self.app = app
        self.max_json = max_json
        self.max_upload = max_upload

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        upload = scope["path"] == UPLOAD_PATH
        limit = self.max_upload if upload else self.max_json
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        length = headers.get("content-length")
        response = None
        if length is not None:
            if not length.isdigit():
                response = _error(400, "bad_request", "Content-Length must be a non-negative integer")
            elif int(length) > limit:
                response = _error(
                    413, "too_large", f"the body is {int(length)} bytes; this endpoint takes at most {limit}"
                )
        elif not upload:
            response = _error(411, "length_required", "send the JSON body with a Content-Length header")
        if response is None and upload and ctype not in ("application/zip", "application/octet-stream"):
            response = _error(415, "unsupported_media_type", "upload the patch as application/zip")
        if response is None and not upload and ctype != "application/json":
            response = _error(415, "unsupported_media_type", "send the body as application/json")
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(
    state: ServerState,
    *,
    token: str | None = None,
    host: str = "127.0.0.1",
    max_json_bytes: int = 64 * 1024,
    max_upload_bytes: int = 64 * 1024 * 1024,
) -> FastAPI:
    """The API + page over ``state``.

    Args:
        state: the served model and its edit session.
        token: required on state-changing requests when set (see ``resolve_token``).
        host: the address the server binds; on loopback, requests must name a loopback Host (DNS rebinding).
        max_json_bytes: cap on JSON bodies.
        max_upload_bytes: cap on patch uploads (the zip); its unpacked size is capped at 4x this.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.start()
        yield
        state.stop()

    app = FastAPI(
        title="lmedit playground API",
        version="1",
        summary="Generate, score, edit, undo, download and upload patches on one served model.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_json=max_json_bytes, max_upload=max_upload_bytes)
    if is_loopback(host):
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["localhost", "127.0.0.1", "[::1]", host])

    def auth(request: Request) -> None:
        if token is None:
            return
        supplied = request.headers.get("x-lmedit-token")
        bearer = request.headers.get("authorization", "")
        if supplied is None and bearer.lower().startswith("bearer "):
            supplied = bearer[7:].strip()
        if not supplied or not hmac.compare_digest(supplied.encode(), token.encode()):
            raise ServeError(
                401,
                "this server requires a token for state-changing requests: send 'Authorization: Bearer TOKEN'",
                "unauthorized",
            )

    @app.exception_handler(LmeditError)
    async def lmedit_error(_request: Request, exc: LmeditError) -> JSONResponse:
        status, kind, message = error_info(exc)
        return _error(status, kind, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            {"field": ".".join(str(x) for x in e.get("loc", ()) if x != "body"), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        message = "; ".join(f"{f['field'] or 'body'}: {f['message']}" for f in fields)
        return _error(422, "validation", message, fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http", str(exc.detail))

    def job_response(job: Job, wait: bool) -> JSONResponse:
        if wait:
            job.wait(WAIT_LIMIT_S)
        view = state.job_view(job)
        if job.status == "failed":
            return _error(job.error["status"], job.error["type"], job.error["message"], job=job.id)
        status = 200 if job.status == "done" else 202
        return JSONResponse(view, status_code=status, headers={"Location": f"/api/jobs/{job.id}"})

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/info", tags=["read"])
    def info() -> dict:
        """Model, registered methods with their hyperparameters (defaults for this model), capabilities."""
        return state.info() | {"token_required": token is not None, "max_upload_bytes": max_upload_bytes}

    @app.post("/api/generate", tags=["read"])
    def generate(body: GenerateBody) -> dict:
        """Greedy continuation and the top-5 next tokens with probabilities, on the current edited model."""
        return state.generate(body.prompt, body.max_new_tokens)

    @app.post("/api/score", tags=["read"])
    def score(body: ScoreBody) -> dict:
        """Teacher-forced log-probabilities of each target after the prompt."""
        return state.score(body.prompt, body.targets)

    @app.post("/api/edit", tags=["edit"], status_code=202, dependencies=[Depends(auth)])
    def edit(body: EditBody) -> JSONResponse:
        """Queue an edit; the result holds before/after generations and a teacher-forced metric table.

        Answers 202 with ``{"job", "position"}`` (poll ``GET /api/jobs/{job}``), or with ``"wait": true`` the
        finished job (200) or its error (4xx/5xx; the session is unchanged).
        """
        spec = EditSpec(
            prompt=body.prompt,
            subject=body.subject,
            target_new=body.target_new,
            target_true=body.target_true,
            paraphrases=body.paraphrases,
            unrelated=body.unrelated,
            method=body.method,
            hparams=dict(body.hparams),
            max_new_tokens=body.max_new_tokens,
        )
        return job_response(state.submit_edit(spec), body.wait)

    @app.get("/api/jobs/{job_id}", tags=["edit"])
    def job(
        job_id: Annotated[str, PathParam(max_length=32)], wait: float = Query(0.0, ge=0, le=60)
    ) -> JSONResponse:
        """Status of a queued state change: queued (with position), running, done (result) or failed (error)."""
        j = state.job(job_id)
        if wait:
            j.wait(wait)
        return JSONResponse(state.job_view(j))

    @app.get("/api/history", tags=["read"])
    def history() -> dict:
        """Applied edits, oldest first, with their ids."""
        return state.history()

    @app.post("/api/undo", tags=["edit"], status_code=202, dependencies=[Depends(auth)])
    def undo(body: UndoBody) -> JSONResponse:
        """Remove any edit: undo down to it and re-apply the later ones (queued like edits)."""
        return job_response(state.submit_undo(body.edit_id, body.rebase), body.wait)

    @app.post("/api/reset", tags=["edit"], status_code=202, dependencies=[Depends(auth)])
    def reset(body: ResetBody) -> JSONResponse:
        """Undo every edit (queued like edits)."""
        return job_response(state.submit_reset(), body.wait)

    @app.get("/api/patches/{edit_id}", tags=["patches"], response_class=Response)
    def download(edit_id: int) -> Response:
        """The patch of edit ``edit_id`` as a zip of its folder (patch.json + patch.safetensors)."""
        name, data = state.patch_zip(edit_id)
        return Response(
            data,
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @app.post(
        UPLOAD_PATH,
        tags=["patches"],
        status_code=202,
        dependencies=[Depends(auth)],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload(request: Request, wait: bool = Query(False)) -> JSONResponse:
        """Apply an uploaded patch zip; refused (409) unless it matches the current model's tensors."""
        with tempfile.TemporaryDirectory(prefix="lmedit-upload-") as tmp:
            path = Path(tmp) / "patch.zip"
            size = 0
            with open(path, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload_bytes:
                        return _error(
                            413, "too_large", f"the upload exceeds {max_upload_bytes} bytes; refused"
                        )
                    fh.write(chunk)
            if size == 0:
                return _error(400, "bad_patch", "the upload is empty; send the patch zip as the body")
            patch = await run_in_threadpool(read_patch_zip, path, 4 * max_upload_bytes)
        job = state.submit_patch(patch)
        return await run_in_threadpool(job_response, job, wait)

    @app.post("/api/trace", tags=["read"])
    def trace(body: TraceBody) -> dict:
        """Causal-tracing heatmap: P(answer) with one state restored, ``scores[kind]`` [layers, tokens].

        Holds the model for the whole trace (seconds on the bundled model); 501 without ``lmedit.locate``.
        """
        return state.trace(body.prompt, body.subject, body.kind, body.samples, body.answer)

    return app


def serve(
    model: str = "gemma3-270m",
    host: str = "127.0.0.1",
    port: int = 7860,
    token: str | None = None,
    log_level: str = "info",
    device: str | None = None,
) -> None:
    """Load ``model`` (on ``device``, default CPU) and serve the playground until interrupted (``lmedit serve
    --help``)."""
    import uvicorn

    from lmedit.models.load import load_model

    token = resolve_token(host, token)
    loaded = load_model(model, device=device)
    app = create_app(ServerState(loaded), token=token, host=host)
    log.info("serving %s on http://%s:%d (token %s)", loaded.name, host, port, "required" if token else "off")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
