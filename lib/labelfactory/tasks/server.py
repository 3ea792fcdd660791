"""The FastAPI app MONAI Label serves, with labelfactory's answers to bad input, uploads and load.

Start with `monailabel start_server --uvicorn_app labelfactory.tasks.server:app ...` (what
`labelfactory serve` does). MONAI Label's own app, plus:
- Errors are answers: a `LabelFactoryError` gets its status, MONAI Label's invalid-input errors
  400, a `params` / `info` form field that is not a JSON object 400; never a traceback.
- JSON is bounded: form fields (`params`, `info`) and every JSON body (BoundedJson) over
  `LABELFACTORY_MAX_JSON_KB` (default 1024) 413, nested deeper than `LABELFACTORY_MAX_JSON_DEPTH`
  (default 32) or holding NaN / Infinity 400, each naming the field. Options are parsed from the
  config dataclasses before any work (a training's before it is submitted; unknown strategy or model 404).
- Uploads (infer `file`, label saves, image uploads, session images) are streamed into a temp file
  that is removed whatever the outcome; a body over `LABELFACTORY_MAX_UPLOAD_MB` (default 4096) is
  refused (413); a session archive (`uncompress=true`) is unpacked only where it cannot leave its folder,
  and only up to `LABELFACTORY_MAX_ARCHIVE_MB` (default 2048) and `LABELFACTORY_MAX_ARCHIVE_FILES` (10000).
- Idle connections are closed: one with no request under way for `LABELFACTORY_IDLE_TIMEOUT_S`
  (default 60; uvicorn's own keep-alive timer only starts after a first response).
- Light routes stay light: MONAI Label runs infers and next-sample inside the event loop, so
  `/info` and a label save waited behind a segmentation. Here infers run in a bounded worker pool
  (`LABELFACTORY_INFER_WORKERS`, default 2) and next-sample in its own, one at a time (each picks
  after the last one's image is added, so concurrent callers get distinct images); label and
  image saves run in the server's thread pool.
- Work stops when nobody waits: at most `LABELFACTORY_INFER_QUEUE` (default 8) requests wait per
  pool, more get 429; a request whose client disconnected before its turn is not run.
- Training: exactly one `POST /train/{model}` is accepted while a training runs or waits to start;
  the others get 429 (MONAI Label counted only started ones, so a burst queued duplicates), and so
  while the models folder's training lock names a live trainer (one a killed server left running).
- Model files: `PUT` / `DELETE /model/{model}` are off (403) unless `LABELFACTORY_MODEL_ROUTES=true`
  (`labelfactory serve --model-routes`); then admin-only, and an upload must load as a labelfactory
  checkpoint of that model's kind, published with its hash, the previous version kept.
- Authentication: MONAI Label's OIDC bearer tokens (`MONAI_LABEL_AUTH_*`), with the token's
  signature algorithm named (MONAI Label's `jwt.decode` gave PyJWT 2 none, so every token was
  refused) and an expiry required; an unreachable identity provider answers 503.
- MONAI Label routes that answered 500 (found by fuzzing): a batch infer's options are checked (400) and
  fitted to the GPUs there are (none: one device, never a modulo by zero), run_sync off the event loop; a
  session id is a session id (404), a series session's image=true 400; whole-slide infers 404 (no WSI model);
  output=dicom_seg 400 and /proxy/dicom 404 on a folder datastore; /logs/gpu 404 without nvidia-smi, /logs/
  lines bounded (400 past MAX_LOG_LINES); the dataset archive (GET /datastore/dataset) is built one at a time,
  off the loop, and unlinked once opened (each download left a copy of every labelled image in the temp folder),
  404 when nothing is labelled.
Routes replaced keep MONAI Label's paths, parameters and roles, and call its own functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import requests
import torch
from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from monailabel.app import app
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.endpoints import activelearning as al_endpoint
from monailabel.endpoints import batch_infer as batch_endpoint
from monailabel.endpoints import datastore as ds_endpoint
from monailabel.endpoints import infer as infer_endpoint
from monailabel.endpoints import logs as logs_endpoint
from monailabel.endpoints import model as model_endpoint
from monailabel.endpoints import proxy as proxy_endpoint
from monailabel.endpoints import session as session_endpoint
from monailabel.endpoints import train as train_endpoint
from monailabel.endpoints import wsi_infer as wsi_endpoint
from monailabel.endpoints.user import auth as auth_endpoint
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.utils import tasks as async_tasks
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from labelfactory import training_lock
from labelfactory.checkpoints import load_checkpoint, publish_model
from labelfactory.errors import LabelFactoryError
from labelfactory.io.image import suffix_of
from labelfactory.limits import (
    IDLE_TIMEOUT_S,
    INFER_QUEUE,
    INFER_WORKERS,
    MAX_ARCHIVE_FILES,
    MAX_ARCHIVE_MB,
    MAX_JSON_DEPTH,
    MAX_JSON_KB,
    MAX_UPLOAD_MB,
)
from labelfactory.tasks.base import TrainBase
from labelfactory.tasks.datastore import check_id
from labelfactory.tasks.uploads import UPLOAD_PREFIX, new_upload, release

logger = logging.getLogger(__name__)

_STATUS = {MONAILabelError.INVALID_INPUT: 400, MONAILabelError.SERVER_ERROR: 500}
API = settings.MONAI_LABEL_API_STR
_SUFFIX = re.compile(r"^(\.[A-Za-z0-9]{1,8}){1,2}$")
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")  # MONAI Label's are uuid1 strings; never a path
_SET_BY_THE_SERVER = ("image", "model", "session")  # infer request keys params would otherwise overwrite
USER, ANNOTATOR, ADMIN = (
    settings.MONAI_LABEL_AUTH_ROLE_USER,
    settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR,
    settings.MONAI_LABEL_AUTH_ROLE_ADMIN,
)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def max_upload_bytes() -> int:
    return MAX_UPLOAD_MB.value() << 20


class WorkQueue:
    """`workers` threads and at most `waiting` requests queued for them; the rest answered 429.

    A request waits for its turn in the event loop (not in the executor's unbounded queue), so one
    whose client has gone by then is dropped without running: the ASGI server reports the disconnect
    (`Request.is_disconnected`) and nobody would read the answer."""

    def __init__(self, name: str, workers: int, waiting: int):
        self.name, self.workers, self.waiting = name, workers, waiting
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=f"lf-{name}")
        self._turns = asyncio.Semaphore(workers)
        self._pending = 0  # waiting + running; changed only in the event loop's thread

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """A place in this queue (429 when there is none), held until the request is answered."""
        if self._pending >= self.workers + self.waiting:
            raise LabelFactoryError(
                f"the server is busy: {self.workers} {self.name} running and {self.waiting} waiting "
                "(LABELFACTORY_INFER_QUEUE); try again shortly",
                status=429,
            )
        self._pending += 1
        try:
            yield
        finally:
            self._pending -= 1

    async def run(self, request: Request, fn: Callable, *args) -> Any:
        """`fn(*args)` on a worker once one is free, unless the client disconnected meanwhile (499, not run)."""
        async with self._turns:
            if await request.is_disconnected():
                logger.info(f"{self.name}: {request.url.path} not run: its client disconnected while it waited")
                raise LabelFactoryError("the client closed the request before its turn: not run", status=499)
            return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))


_WAITING = INFER_QUEUE.value()
_INFERS = WorkQueue("infers", INFER_WORKERS.value(), _WAITING)
_SAMPLES = WorkQueue("next-sample requests", 1, _WAITING)  # one at a time: each pick sees the last one's image
_ARCHIVES = WorkQueue("dataset archives", 1, _WAITING)  # each a temp copy of every labelled image: one at a time


# ---- errors ----


@app.exception_handler(LabelFactoryError)
async def _labelfactory_error(request: Request, exc: LabelFactoryError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"detail": str(exc)})


@app.exception_handler(MONAILabelException)
async def _monailabel_error(request: Request, exc: MONAILabelException) -> JSONResponse:
    if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)):
        status = 404
    else:
        status = _STATUS.get(exc.error, 500)
    return JSONResponse(status_code=status, content={"detail": exc.msg})


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's answer, with the upload limit named where Starlette's body limiter says only "Content Too Large"."""
    if exc.status_code == 413:
        exc = StarletteHTTPException(413, upload_limit_message(), exc.headers)
    return await http_exception_handler(request, exc)


def upload_limit_message(size: int | None = None) -> str:
    body = f"the request body ({size >> 20} MB)" if size is not None else "the request body"
    return f"{body} is over the server's upload limit ({MAX_UPLOAD_MB.named()})"


class _NotFinite(ValueError):
    pass


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400: JSON allows the digits, not the infinity they make
        raise _NotFinite(text)
    return value


def _no_constant(name: str) -> None:
    raise _NotFinite(name)


def parse_json(text: str | bytes | None, field: str, hint: str = "") -> Any:
    """JSON text -> its value, bounded before it is parsed: over MAX_JSON_KB 413; nested deeper than MAX_JSON_DEPTH
    400 (Python's parser would recurse until it fails: a 500); NaN, Infinity and numbers beyond a float 400 (a NaN
    stored in the datastore's index made every later write of it fail)."""
    size = len(text.encode() if isinstance(text, str) else text or b"")
    if size > MAX_JSON_KB.value() << 10:
        raise LabelFactoryError(f"{field} ({size >> 10} KB) is over the server's limit ({MAX_JSON_KB.named()})", 413)
    _check_depth(text or "", field)
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite) if text else None
    except _NotFinite as e:
        raise LabelFactoryError(f"{field}: {e} is not a finite number; send a number or null") from None
    except json.JSONDecodeError as e:
        raise LabelFactoryError(f"{field} is not JSON{hint}: {e.msg} at character {e.pos}") from None
    except (ValueError, RecursionError) as e:  # a number of more digits than Python converts
        raise LabelFactoryError(f"{field} is not JSON this server reads{hint}: {str(e)[:200]}") from None


def json_form(text: str | bytes | None, field: str) -> dict[str, Any]:
    """A form field holding a JSON object -> dict (parse_json's bounds); 400 naming the field otherwise."""
    value = parse_json(text, field, f" ({field} must be a JSON object, e.g. {field}={{}})")
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise LabelFactoryError(f"{field} must be a JSON object ({{...}}), got a {type(value).__name__}")
    return value


_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(rb"[^\[\]{}]")


def _check_depth(text: str | bytes, field: str) -> None:
    """400 if the JSON text nests deeper than MAX_JSON_DEPTH (its brackets outside strings, counted at C speed)."""
    data = text.encode() if isinstance(text, str) else text
    brackets = np.frombuffer(_NOT_BRACKETS.sub(b"", _STRINGS.sub(b"", data)), np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    if steps.size and int(np.cumsum(steps).max()) > MAX_JSON_DEPTH.value():
        raise LabelFactoryError(f"{field} is nested deeper than the server's limit ({MAX_JSON_DEPTH.named()})")


class BoundedJson:
    """ASGI middleware: a JSON body (any route: next sample, train, scoring, batch infer ...) is read whole, up to
    MAX_JSON_KB, checked by parse_json (413 / 400 naming the limit) and only then handed on to the app; FastAPI's
    own parser took NaN and recursed into a 500 on deep nesting."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS") or not _json_type(scope):
            return await self.app(scope, receive, send)
        if dict(scope.get("headers") or []).get(b"content-length") == b"0":  # no body: receive() left as it is, so
            return await self.app(scope, receive, send)  # the queue's disconnect check sees the client leave
        body, more, limit = bytearray(), True, MAX_JSON_KB.value() << 10
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                more = False
        try:
            parse_json(bytes(body), "the JSON body")
        except LabelFactoryError as e:
            return await JSONResponse(status_code=e.status, content={"detail": str(e)})(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _json_type(scope) -> bool:
    """Whether FastAPI would parse the body as JSON: no content type, application/json or application/*+json."""
    value = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip().lower()
    return value in (b"", b"application/json") or (value.startswith(b"application/") and value.endswith(b"+json"))


app.add_middleware(BoundedJson)


# ---- connections: one with no request under way is closed ----


def close_idle_connections(protocol_class: type) -> None:
    """Make uvicorn's HTTP protocol close a connection that has had no request under way for IDLE_TIMEOUT_S.

    uvicorn's keep-alive timer (5 s, its default, which MONAI Label keeps) starts only after a response: a client
    that connected and sent nothing, or half a request line, held its connection and socket for ever; so did one
    that announced a body and stopped sending it. Checked every IDLE_TIMEOUT_S: closed when no request began since
    the last check and none is running, or when the request's body is unfinished and not a byte of it came since
    (while the server itself has not paused reading). A long infer, or an upload that keeps sending, is never cut."""
    made, received = protocol_class.connection_made, protocol_class.data_received
    if getattr(made, "closes_idle", False):
        return

    def connection_made(self, transport, *args, **kwargs):
        made(self, transport, *args, **kwargs)
        seconds = IDLE_TIMEOUT_S.value()
        self.bytes_received = 0
        seen = [self.cycle, 0]

        def check() -> None:
            if transport.is_closing():
                return
            cycle, count = self.cycle, self.bytes_received
            idle = cycle is None or cycle.response_complete
            stalled = cycle is not None and cycle.more_body and count == seen[1] and not self.flow.read_paused
            if cycle is seen[0] and (idle or stalled):
                transport.close()
                return
            seen[:] = [cycle, count]
            self.loop.call_later(seconds, check)

        self.loop.call_later(seconds, check)

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        received(self, data)

    connection_made.closes_idle = True
    protocol_class.connection_made, protocol_class.data_received = connection_made, data_received


def _patch_protocols() -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    close_idle_connections(H11Protocol)
    with contextlib.suppress(ImportError):  # httptools is optional; uvicorn uses it when installed
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        close_idle_connections(HttpToolsProtocol)


_patch_protocols()


# ---- uploads: bounded, always removed ----


class BoundedBody:
    """ASGI middleware: a body over max_upload_bytes() is answered 413.

    One that announces its length is refused before a byte is read, with a message naming the limit;
    a streamed one (no Content-Length) is cut where it passes the limit, by Starlette's body limiter."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = max_upload_bytes()
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            response = JSONResponse(status_code=413, content={"detail": upload_limit_message(int(length))})
            return await response(scope, receive, send)
        await RequestBodyLimitMiddleware(self.app, limit)(scope, receive, send)


app.add_middleware(BoundedBody)


def upload_suffix(filename: str | None) -> str:
    """The upload's format suffix (".nii.gz", ".seg.nrrd", ...) as the readers name formats; ".nii.gz" if none."""
    suffix = suffix_of(Path(filename or "upload").name)
    return suffix if _SUFFIX.match(suffix) else ".nii.gz"


@contextlib.asynccontextmanager
async def saved_upload(file: UploadFile | None) -> AsyncIterator[str | None]:
    """The upload as a temp file in the system temp folder (where the app takes uploads); removed on exit, always."""
    if file is None:
        yield None
        return
    fd, path = new_upload(upload_suffix(file.filename))  # the app's infer takes it while it is live
    try:
        with os.fdopen(fd, "wb") as out:
            await run_in_threadpool(shutil.copyfileobj, file.file, out)  # bounded: the body is (BoundedBody)
        yield path
    finally:
        release(path)
        Path(path).unlink(missing_ok=True)


def _replace_route(router: APIRouter, path: str, methods: set[str]) -> None:
    """Drop MONAI Label's route for `path` + `methods`, so the one defined next answers it.

    Removed from its own router and from the app: FastAPI copies included routes into the app
    (older versions) or keeps a reference to the included router (newer ones). Done at import,
    before the first request builds any route cache.
    """
    for routes, full in ((router.routes, path), (app.router.routes, API + path)):
        routes[:] = [r for r in routes if not (isinstance(r, APIRoute) and r.path == full and r.methods & methods)]


# ---- infer and next sample: off the event loop, in bounded pools ----

_replace_route(infer_endpoint.router, "/infer/{model}", {"POST"})


def infer_params(params: str | None, session_id: str) -> dict[str, Any]:
    """An infer's `params` form field, refused (400) where it would redirect the infer: MONAI Label merges params
    over the request, so `image`, `model` or `session` there would replace what the query names. A `session_id`
    must name a session of this server (404 otherwise)."""
    p = json_form(params, "params")
    redirects = sorted(k for k in _SET_BY_THE_SERVER if k in p)
    if redirects:
        raise LabelFactoryError(
            f"params may not set {', '.join(redirects)}: the image is image=<id>, file=... or session_id=<id>"
        )
    if session_id:
        session_of(session_id)
    return p


def session_of(session_id: str, update_ts: bool = False):
    """The session `session_id` names (its SessionInfo): 404 for an unknown one or an id that is not a session
    id (MONAI Label joins it to the sessions folder: '..' named the folder above), 406 when sessions are off."""
    sessions = app_instance().sessions()
    if sessions is None:
        raise LabelFactoryError("sessions are off on this server (MONAI_LABEL_SESSIONS=false)", status=406)
    info = sessions.get_session(session_id, update_ts=update_ts) if _SESSION_ID.fullmatch(session_id) else None
    if not info:
        raise LabelFactoryError(f"no session {session_id!r} (create one with PUT /session/)", status=404)
    return info


@app.post(API + "/infer/{model}", summary="Run inference (labelfactory: in a bounded worker pool)")
async def api_run_inference(
    request: Request,
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: infer_endpoint.ResultType | None = None,
    user: User = Depends(RBAC(USER)),
):
    p = infer_params(params, session_id)
    if output == infer_endpoint.ResultType.dicom_seg and not isinstance(app_instance().datastore(), DICOMWebDatastore):
        raise LabelFactoryError("output=dicom_seg needs a DICOMweb datastore; this one is a folder: use image or json")
    if label is not None:
        raise LabelFactoryError("no labelfactory model takes a label with its infer: send the image only")
    if not (image or file or session_id):
        raise LabelFactoryError("give the image to infer on: image=<datastore id> (or upload it as file=...)")
    async with _INFERS.place(), saved_upload(file) as path:
        return await _INFERS.run(
            request,
            infer_endpoint.run_inference,
            background_tasks,
            model,
            path or image,
            session_id,
            json.dumps(p),
            None,
            None,
            output,
        )


_replace_route(al_endpoint.router, "/activelearning/{strategy}", {"POST"})


@app.post(API + "/activelearning/{strategy}", summary="Next sample (labelfactory: in a bounded worker pool)")
async def api_sample(request: Request, strategy: str, params: dict | None = None, user: User = Depends(RBAC(USER))):
    strategies = app_instance()._strategies  # MONAI Label answers an unknown one with a 500 (APP_INIT_ERROR)
    if (strategy or "random") not in strategies:
        known = ", ".join(sorted(strategies)) or "none (skip_strategies)"
        raise LabelFactoryError(f"no strategy '{strategy}' on this server; strategies: {known}", status=404)
    async with _SAMPLES.place():
        return await _SAMPLES.run(request, al_endpoint.sample, strategy, params, user.username)


# ---- datastore writes: JSON checked, uploads removed, off the event loop ----


def _save_label(image: str, path: str, tag: str, params: dict[str, Any]) -> dict[str, Any]:
    instance = app_instance()
    label_id = instance.datastore().save_label(image, path, tag, params)
    return {**(instance.on_save_label(image, label_id) or {}), "image": image, "label": label_id}


_replace_route(ds_endpoint.router, "/datastore/label", {"PUT"})


@app.put(API + "/datastore/label", summary="Save a finished label (labelfactory: validated, atomic)")
async def api_save_label(
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(ANNOTATOR)),
):
    p = json_form(params, "params")
    async with saved_upload(label) as path:
        return await run_in_threadpool(_save_label, image, path, tag or DefaultLabelTag.FINAL.value, p)


_replace_route(ds_endpoint.router, "/datastore/image", {"PUT"})
_replace_route(ds_endpoint.router, "/datastore/", {"PUT"})


@app.put(API + "/datastore/", include_in_schema=False, deprecated=True)
@app.put(API + "/datastore/image", summary="Upload a new image (labelfactory: validated, atomic)")
async def api_add_image(
    image: str | None = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(ANNOTATOR)),
):
    p = json_form(params, "params")
    if user.username:
        p["user"] = user.username
    image_id = image or Path(file.filename or "").name.removesuffix(upload_suffix(file.filename))
    if not image_id:
        raise LabelFactoryError("give the new image's id: image=<id>")
    async with saved_upload(file) as path:
        return {"image": await run_in_threadpool(app_instance().datastore().add_image, image_id, path, p)}


_replace_route(ds_endpoint.router, "/datastore/image/info", {"PUT"})


@app.put(API + "/datastore/image/info", summary="Update image info")
async def api_put_image_info(image: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
    i = {**json_form(info, "info"), **({"user": user.username} if user.username else {})}
    return await run_in_threadpool(app_instance().datastore().update_image_info, image, i)


_replace_route(ds_endpoint.router, "/datastore/label/info", {"PUT"})
_replace_route(ds_endpoint.router, "/datastore/updatelabelinfo", {"PUT"})


@app.put(API + "/datastore/updatelabelinfo", include_in_schema=False, deprecated=True)
@app.put(API + "/datastore/label/info", summary="Update label info")
async def api_put_label_info(
    label: str, tag: str, info: str = Form(None), params: str = Form(None), user: User = Depends(RBAC(ANNOTATOR))
):
    i = {
        **json_form(info if info is not None else params, "info"),
        **({"user": user.username} if user.username else {}),
    }
    return await run_in_threadpool(app_instance().datastore().update_label_info, label, tag, i)


_replace_route(ds_endpoint.router, "/datastore/dataset", {"GET"})


def _dataset_archive(limit_cases: int | None):
    """MONAI Label's archive of the labelled images, opened and already unlinked (it left every one in the temp
    folder: a disk filled by repeated downloads); 404 when nothing is labelled (its assert was a 500)."""
    datastore = app_instance().datastore()
    if not datastore.datalist():
        raise LabelFactoryError("no image in the datastore has a label: there is no dataset to download", status=404)
    path = datastore.get_dataset_archive(limit_cases)
    archive = open(path, "rb")  # closed by _chunks once sent (or when a dropped response is collected)
    os.unlink(path)
    return archive


def _chunks(archive) -> Any:
    with archive:
        yield from iter(lambda: archive.read(1 << 20), b"")


@app.get(API + "/datastore/dataset", summary="Download the labelled images as a ZIP (labelfactory: nothing left)")
async def api_download_dataset(request: Request, limit_cases: int | None = None, user: User = Depends(RBAC(ANNOTATOR))):
    async with _ARCHIVES.place():
        archive = await _ARCHIVES.run(request, _dataset_archive, limit_cases)
    disposition = {"Content-Disposition": 'attachment; filename="dataset.zip"'}
    return StreamingResponse(_chunks(archive), media_type="application/zip", headers=disposition)


# ---- sessions (an image sent for inference only, as Slicer does for a local volume): bounded, removed ----

_replace_route(session_endpoint.router, "/session/", {"PUT"})


def _new_session(sessions, received: Path, names: list[str], expiry: int, uncompress: bool) -> dict[str, Any]:
    source = received / names[0] if len(names) == 1 else received
    if uncompress:  # an archive of a series (e.g. DICOM): unpacked here, members that leave the folder refused
        if len(names) != 1:
            raise LabelFactoryError("uncompress=true takes one archive")
        unpacked = received / "unpacked"
        try:
            unpack_bounded(source, unpacked, names[0])
        except LabelFactoryError:
            raise
        except (ValueError, OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as e:
            raise LabelFactoryError(f"{names[0]} is not an archive this server unpacks safely: {e}") from e
        if not unpacked.is_dir() or not any(p.is_file() for p in unpacked.rglob("*")):
            raise LabelFactoryError(f"{names[0]} holds no files")
        source = unpacked
    session_id, info = sessions.add_session(str(source), expiry, False)
    return {"session_id": session_id, "session_info": info.to_json()}


def unpack_bounded(archive: Path, folder: Path, name: str) -> None:
    """Unpack a zip or tar (any compression) into `folder`: no member outside it, no links or devices, at most
    MAX_ARCHIVE_FILES members and MAX_ARCHIVE_MB unpacked, checked on the declared sizes before a byte is written
    and counted again on what was written (zip sizes can lie; zipfile stops at the declared one)."""
    max_files, max_bytes = MAX_ARCHIVE_FILES.value(), MAX_ARCHIVE_MB.value() << 20

    def check(count: int, total: int) -> None:
        if count > max_files:
            raise LabelFactoryError(
                f"{name} holds over {max_files} files, the server's limit ({MAX_ARCHIVE_FILES.named()})"
            )
        if total > max_bytes:
            raise LabelFactoryError(
                f"{name} unpacks to over {max_bytes >> 20} MB, the server's limit ({MAX_ARCHIVE_MB.named()})", 413
            )

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            members = z.infolist()
            check(len(members), sum(m.file_size for m in members))
            written = 0
            for m in members:
                written += Path(z.extract(m, folder)).stat().st_size if not m.is_dir() else 0  # names sanitised
                check(0, written)
        return
    with tarfile.open(archive) as tar:  # members read one by one: a member past a limit stops the listing
        members, total = [], 0
        for m in tar:
            members.append(m)
            total += m.size
            check(len(members), total)
        tar.extractall(folder, members=members, filter="data")  # refuses members outside, links, devices


@app.put(API + "/session/", summary="Create a session with an image (labelfactory: bounded, removed, off the loop)")
async def api_create_session(
    uncompress: bool = False,
    expiry: int = 0,
    files: list[UploadFile] = File(...),
    user: User = Depends(RBAC(USER)),
):
    sessions = app_instance().sessions()
    if sessions is None:
        raise LabelFactoryError("sessions are off on this server (MONAI_LABEL_SESSIONS=false)", status=406)
    received = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX))
    try:
        names = []
        for i, f in enumerate(files):
            name = Path(f.filename or "").name
            names.append(name if name not in ("", ".", "..", "unpacked") else f"file{i}{upload_suffix(None)}")
            with open(received / names[-1], "wb") as out:
                await run_in_threadpool(shutil.copyfileobj, f.file, out)
        return await run_in_threadpool(_new_session, sessions, received, names, expiry, uncompress)
    finally:
        shutil.rmtree(received, ignore_errors=True)


_replace_route(session_endpoint.router, "/session/{session_id}", {"GET", "DELETE"})


@app.get(API + "/session/{session_id}", summary="Get a session (labelfactory: a series session's image=true 400)")
async def api_get_session(
    session_id: str, update_ts: bool = False, image: bool = False, user: User = Depends(RBAC(USER))
):
    info = session_of(session_id, update_ts)
    if image and not os.path.isfile(info.image):  # FileResponse on a folder was a 500
        raise LabelFactoryError(
            f"session {session_id} holds a series (several files), not one image file: image=true downloads "
            "single-file sessions only; infer on it with session_id=..."
        )
    return session_endpoint.get_session(session_id, update_ts, image)


@app.delete(API + "/session/{session_id}", summary="Delete a session (labelfactory: session ids only)")
async def api_remove_session(session_id: str, user: User = Depends(RBAC(USER))):
    session_of(session_id)
    return session_endpoint.remove_session(session_id)


# ---- batch infer: options checked before the task starts; run_sync off the event loop ----

_replace_route(batch_endpoint.router, "/batch/infer/{model}", {"POST"})
_WHOLE = re.compile(r"[0-9]{1,3}(,[0-9]{1,3})*")


def batch_params(model: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """A batch infer's params, checked (400 naming the option; unknown model 404) and fitted to this machine's GPUs:
    MONAI Label spreads the images over `gpus` (default all) when multi_gpu (default true), so on a machine without
    CUDA it divided by zero GPUs (a 500, or a failed task)."""
    infers = app_instance()._infers
    if model not in infers:
        raise LabelFactoryError(f"no model '{model}' on this server; models: {', '.join(sorted(infers))}", status=404)
    p = dict(params or {})
    if "model" in p:
        raise LabelFactoryError("params may not set model: the model is the one in the path, /batch/infer/<model>")
    for key in ("max_batch_size", "max_workers"):
        if key in p and not (type(p[key]) is int and p[key] >= 0):
            raise LabelFactoryError(f"option {key}={p[key]!r}: give a whole number >= 0 (0: no limit)")
    if "label_tag" in p:
        check_id(p["label_tag"], "label tag")
    if "images" in p:
        if not isinstance(p["images"], list):
            raise LabelFactoryError("option images: give a list of image ids, or images=all|labeled|unlabeled")
        for image in p["images"]:
            check_id(image)
    if "multi_gpu" in p and not isinstance(p["multi_gpu"], bool):
        raise LabelFactoryError(f"option multi_gpu={p['multi_gpu']!r}: give true or false")
    count = torch.cuda.device_count()
    gpus = p.get("gpus", "all")
    if gpus != "all" and not (
        isinstance(gpus, str) and _WHOLE.fullmatch(gpus) and all(int(g) < count for g in gpus.split(","))
    ):
        have = f"GPU numbers below {count}, e.g. '0'" if count else "nothing: this server has no GPU"
        raise LabelFactoryError(f"option gpus={gpus!r}: give 'all' or {have}")
    if not count:
        p["multi_gpu"] = False  # one device, the CPU
    return p


@app.post(API + "/batch/infer/{model}", summary="Run batch inference (labelfactory: options checked)")
async def api_batch_infer(
    model: str,
    images: batch_endpoint.BatchInferImageType | None = batch_endpoint.BatchInferImageType.IMAGES_ALL,
    params: dict | None = None,
    run_sync: bool | None = False,
    user: User = Depends(RBAC(ADMIN)),
):
    p = batch_params(model, params)
    if run_sync:  # every image's infer, in the request: never in the event loop
        return await run_in_threadpool(batch_endpoint.run, model, images, p, True)
    return batch_endpoint.run(model, images, p, False)


# ---- MONAI Label routes that answered 500 here: whole-slide infers (no WSI model), GPU info without a GPU ----

_replace_route(wsi_endpoint.router, "/infer/wsi/{model}", {"POST"})
_replace_route(wsi_endpoint.router, "/infer/wsi_v2/{model}", {"POST"})


@app.post(API + "/infer/wsi/{model}", include_in_schema=False, deprecated=True)
@app.post(API + "/infer/wsi_v2/{model}", summary="Whole-slide infer (labelfactory: none; 404)")
async def api_wsi_infer(model: str, user: User = Depends(RBAC(USER))):
    raise LabelFactoryError(
        "labelfactory serves no whole-slide (WSI) models: infer on CT with POST /infer/{model}", status=404
    )


_replace_route(logs_endpoint.router, "/logs/", {"GET"})
MAX_LOG_LINES = 100_000


@app.get(API + "/logs/", summary="Get logs (labelfactory: lines bounded, read off the loop)")
async def api_get_logs(
    lines: int = 300,
    html: bool = True,
    text: bool = False,
    refresh: int = 0,
    user: User = Depends(RBAC(ADMIN)),
):
    if not 0 <= lines <= MAX_LOG_LINES:  # MONAI Label's deque(file, lines) overflowed past a C ssize_t: a 500
        raise LabelFactoryError(f"lines={lines}: give 1 to {MAX_LOG_LINES} (the last lines of the log), or 0 (all)")
    log = os.path.join(settings.MONAI_LABEL_APP_DIR, "logs", "app.log")
    return await run_in_threadpool(logs_endpoint.get_logs, log, lines, html, text, max(refresh, 0))


_replace_route(logs_endpoint.router, "/logs/gpu", {"GET"})


@app.get(API + "/logs/gpu", summary="GPU info (nvidia-smi; labelfactory: 404 without one)")
async def api_gpu_info(user: User = Depends(RBAC(ADMIN))):
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        raise LabelFactoryError("no nvidia-smi on this server (no NVIDIA driver): there is no GPU info", status=404)
    try:
        done = await run_in_threadpool(functools.partial(subprocess.run, [nvidia_smi], capture_output=True, timeout=30))
    except (OSError, subprocess.SubprocessError) as e:
        raise LabelFactoryError(f"nvidia-smi did not answer: {e}", status=503) from None
    return Response(content=done.stdout.decode(errors="replace"), media_type="text/plain")


_proxy_dicom = proxy_endpoint.proxy_dicom


async def proxy_dicom(request: Request, op: str, path: str):
    """MONAI Label's DICOMweb proxy (every /proxy/dicom route calls it), where the datastore is DICOMweb only: on a
    folder it made the folder's path a URL (a 500)."""
    if not isinstance(app_instance().datastore(), DICOMWebDatastore):
        raise LabelFactoryError("the datastore is a folder, not DICOMweb: nothing to proxy", status=404)
    return await _proxy_dicom(request, op, path)


proxy_endpoint.proxy_dicom = proxy_dicom  # the proxy routes look it up here


# ---- training: one accepted at a time ----

_replace_route(train_endpoint.router, "/train/{model}", {"POST"})


@app.post(API + "/train/{model}", summary="Run a training task (labelfactory: one at a time, others 429)")
async def api_run_model(
    model: str,
    params: dict | None = None,
    run_sync: bool | None = False,
    enqueue: bool | None = False,
    user: User = Depends(RBAC(ADMIN)),
):
    trainers = app_instance()._trainers
    if model not in trainers:
        known = ", ".join(sorted(trainers)) or "none (skip_trainers)"
        raise LabelFactoryError(f"no trainer '{model}' on this server; trainers: {known}", status=404)
    if isinstance(trainers[model], TrainBase):  # its options parsed here: a bad one 400, never a failed training
        trainers[model].parse_request(params or {}, app_instance().datastore())
    # checked and submitted without yielding the event loop, so of a burst exactly one passes
    if not enqueue and any(t.get("status") in ("SUBMITTED", "RUNNING") for t in async_tasks("train")):
        raise LabelFactoryError(
            "a training is already running or about to start: wait for it (GET /train/?check_if_running=true) "
            "or stop it (DELETE /train/), or send enqueue=true to queue this one",
            status=429,
        )
    model_dir = getattr(app_instance(), "model_dir", None)
    live = training_lock.holder(model_dir) if model_dir else None  # a trainer an earlier server left running
    if live is not None:
        raise LabelFactoryError(training_lock.busy_message(live), status=429)
    return train_endpoint.run_model(model, params, run_sync, enqueue)


# ---- model files: published by trainers and labelfactory commands; the API's writes off unless enabled ----

MODEL_ROUTES_ENV = "LABELFACTORY_MODEL_ROUTES"


def _model_file(model: str) -> Path:
    """The single model file behind infer `model` (404 for an unknown model, 400 for one that is a folder)."""
    file = app_instance().model_file(model, validate=False)
    if not file:
        raise LabelFactoryError(f"no model '{model}' on this server", status=404)
    path = Path(file)
    if path.is_dir() or path.suffix != ".pt":
        raise LabelFactoryError(f"'{model}' has no single model file to replace or delete ({path.name} is a folder)")
    return path


def _require_model_routes(action: str) -> None:
    if not _env_true(MODEL_ROUTES_ENV):
        raise LabelFactoryError(
            f"{action} model files through the API is off on this server: models are published by its trainers "
            f"(POST /train/...) and labelfactory commands; an admin may enable PUT / DELETE /model with "
            f"labelfactory serve --model-routes ({MODEL_ROUTES_ENV}=true)",
            status=403,
        )


def _replace_model(model: str, upload: str) -> dict[str, Any]:
    target = _model_file(model)
    payload = load_checkpoint(upload)  # plain data only, hash-checked where the upload carries none: a 409 otherwise
    if payload["kind"] != target.stem:
        raise LabelFactoryError(f"the upload holds a '{payload['kind']}' model; {model} serves '{target.stem}'")
    publish_model(upload, target)
    logger.warning(f"model {model}: {target} replaced through PUT /model (the previous version kept)")
    return {"checksum": model_endpoint.file_checksum(str(target)), "modified_time": int(target.stat().st_mtime)}


def _delete_model(model: str) -> dict[str, Any]:
    target = _model_file(model)
    if not target.is_file():
        raise LabelFactoryError(f"no model file for {model} ({target.name})", status=404)
    model_endpoint.delete_model(model)
    logger.warning(f"model {model}: {target} moved aside through DELETE /model")
    return {}


_replace_route(model_endpoint.router, "/model/{model}", {"PUT", "DELETE"})


@app.put(API + "/model/{model}", summary="Replace a model file (labelfactory: off unless enabled; admin; checked)")
async def api_update_model(model: str, file: UploadFile = File(...), user: User = Depends(RBAC(ADMIN))):
    _require_model_routes("replacing")
    async with saved_upload(file) as path:
        return await run_in_threadpool(_replace_model, model, path)


@app.delete(API + "/model/{model}", summary="Move a model file aside (labelfactory: off unless enabled; admin)")
async def api_delete_model(model: str, user: User = Depends(RBAC(ADMIN))):
    _require_model_routes("deleting")
    return await run_in_threadpool(_delete_model, model)


# ---- authentication: MONAI Label's OIDC tokens, verified with a named algorithm ----

TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


def from_token(token: str) -> User:
    """MONAI Label's `from_token` (key from the realm, user and roles from the claims MONAI_LABEL_AUTH_TOKEN_*
    name), with PyJWT 2's required `algorithms` (asymmetric ones only: the realm's public key) and `exp` required."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return auth_endpoint.DEFAULT_USER
    try:
        key = auth_endpoint.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
    except (requests.RequestException, KeyError, ValueError) as e:
        logger.error(f"identity provider {settings.MONAI_LABEL_AUTH_REALM_URI} unreachable: {e}")
        raise HTTPException(503, "the identity provider cannot be reached: try again later") from None
    payload = jwt.decode(
        token, key, algorithms=TOKEN_ALGORITHMS, options={"verify_aud": False, "require": ["exp"], "verify_exp": True}
    )
    roles: Any = payload
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        roles = roles.get(part) if isinstance(roles, dict) else None
    return User(
        username=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or "",
        email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=[r for r in roles if isinstance(r, str)] if isinstance(roles, list) else [],
    )


auth_endpoint.from_token = from_token  # get_current_user, which every route's RBAC calls, looks it up here


__all__ = ["app", "from_token", "json_form", "max_upload_bytes", "saved_upload"]
