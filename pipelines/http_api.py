"""The HTTP layer of the server: the FastAPI app, its JSON errors, and reading images from requests.

Every client error is a :class:`RequestError` with a status code and becomes ``{"error": "..."}``; FastAPI's
own validation errors (a bad ``top_k``) are 422 in the same shape; running out of memory is a 503; anything
unexpected is a JSON 500 and the replica keeps serving. Bodies are read with a size limit and a deadline
(:func:`read_image_bytes`; Serve's proxy buffers a body before this limit sees it), images decoded within a
:class:`~pipelines.preprocess.DecodeBudget` (:func:`decode_upload`). The routes themselves are methods of the
Serve deployment (:mod:`pipelines.serve`), registered on :data:`api`.
"""

# No ``from __future__ import annotations`` here: Serve pickles the route handlers by value, and FastAPI must
# see real types (not strings to resolve against module globals) in their signatures.
import asyncio
import hmac
import logging
import re

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .preprocess import (
    DecodeBudget,
    ImageDecodeError,
    PreprocessSpec,
    UnsupportedImageFormat,
    check_image_header,
    preprocess_upload,
)

__all__ = ["api", "RequestError", "read_image_bytes", "check_upload", "decode_upload", "authorize"]

logger = logging.getLogger(__name__)
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
#: The boundary parameter of a multipart Content-Type (quoted or not).
_MULTIPART_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)

api = FastAPI(
    title="cnnzoo classifier",
    description="Image classification with the pipeline's registered models. POST an image to /predict.",
    version="1",
)


class ErrorBody(BaseModel):
    """Every error the app answers (the Serve proxy's own 503 and 408 are plain text: README)."""

    error: str = Field(description="what was wrong, and what to send instead")


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries for these error statuses, all ``{"error": ...}`` (FastAPI's default 422 says ``detail``)."""
    meaning = {400: "not an image, or one over the decode budget", 401: "missing or wrong bearer token",
               404: "unknown model alias", 408: "body not received within serve.body_timeout_s",
               413: "body above serve.max_upload_mb", 415: "another content type or image format",
               422: "bad query parameter", 503: "the model cannot load now, or no answer within the deadline"}
    return {status: {"model": ErrorBody, "description": meaning[status]} for status in statuses}


#: /predict's body as OpenAPI describes it (the route reads the raw request, which FastAPI cannot see): the
#: image's bytes, or a multipart form's ``file``; the docs page (/docs) then offers an upload.
PREDICT_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    **{media: {"schema": {"type": "string", "format": "binary"}}
       for media in ("image/png", "image/jpeg", "image/*", "application/octet-stream")},
}}}


class RequestError(Exception):
    """A client error: HTTP ``status`` and a message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@api.exception_handler(RequestError)
async def _request_error(_, err: RequestError):
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_, err: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return JSONResponse({"error": problems}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_, err: StarletteHTTPException):
    # With the exception's headers: a 405 names the methods allowed (RFC 9110), a 401 its WWW-Authenticate.
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)


@api.exception_handler(MemoryError)
async def _out_of_memory(_, err: MemoryError):  # the request asked too much of this replica now, not a bug
    logger.warning("out of memory while answering a request")
    return JSONResponse({"error": "the server ran out of memory for this request; try a smaller image or later"},
                        status_code=503)


@api.exception_handler(Exception)
async def _unexpected(_, err: Exception):  # last resort: a JSON 500, the replica keeps serving
    logger.exception("unexpected error")
    return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)


def authorize(request: Request, token: str | None) -> None:
    """401 unless ``Authorization: Bearer <token>`` matches (no-op when no token is configured)."""
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        # The challenge RFC 9110 requires of every 401 (RFC 6750's scheme): clients that negotiate read it.
        raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise RequestError(413, f"body of {int(declared):,} bytes exceeds the {limit:,}-byte limit")
        except ValueError:
            raise RequestError(400, "invalid Content-Length header") from None
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"body exceeds the {limit:,}-byte limit")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody reads the answer; logged as the server's own error (500) before
        raise RequestError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def read_image_bytes(request: Request, limit: int, timeout_s: float) -> bytes:
    """The uploaded image: the raw body (``image/*``, ``application/octet-stream``) or the multipart field
    ``file``; at most ``limit`` bytes (413 above), received within ``timeout_s`` (408 after: a client that
    stalls mid-body does not keep its slot)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        body = await asyncio.wait_for(_read_limited(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    if content_type.startswith(RAW_IMAGE_TYPES) or (not content_type and body):
        return body
    if content_type == "multipart/form-data":
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as err:  # noqa: BLE001 - malformed multipart
            raise RequestError(400, f"malformed multipart body: {err}") from None
        upload = form.get("file")
        if upload is None:
            boundary = _MULTIPART_BOUNDARY.search(request.headers.get("content-type", ""))
            if boundary and b"--" + boundary.group(1).encode() + b"--" not in body:
                raise RequestError(400, "the multipart body ends before its closing boundary: cut off, or not "
                                        "multipart; send the whole body")
            raise RequestError(400, "multipart body needs the image in a field named 'file'")
        if isinstance(upload, str):  # curl -F 'file=<x.png' sends the bytes as a text field
            raise RequestError(400, "the multipart field 'file' must be a file upload with a filename "
                                    "(curl -F 'file=@image.png'), not a text field")
        return await upload.read()
    if not content_type and not body:
        raise RequestError(400, "empty body: send the image bytes")
    raise RequestError(415, f"unsupported content type {content_type!r}: send image/* bytes or multipart/form-data "
                            "with a 'file' field")


def _image_errors_as_responses(read, *args):
    """``read(*args)``, its refusals as HTTP errors: a refused format 415, any other unreadable or unconvertible
    image 400, ``MemoryError`` 503."""
    try:
        return read(*args)
    except UnsupportedImageFormat as err:
        raise RequestError(415, str(err)) from None
    except ImageDecodeError as err:
        raise RequestError(400, str(err)) from None
    except MemoryError:
        raise RequestError(503, "the server ran out of memory decoding this image; try a smaller one") from None


def check_upload(data: bytes, budget: DecodeBudget) -> None:
    """Refuse an upload from its header alone (format, size, aspect ratio: 415 or 400), before a model is loaded
    for it: a bad request neither loads a model nor evicts one from the replica's cache."""
    _image_errors_as_responses(check_image_header, data, budget)


def decode_upload(data: bytes, spec: PreprocessSpec, budget: DecodeBudget) -> torch.Tensor:
    """Decode an upload within ``budget`` and preprocess it as in training: a (1, C, H, W) tensor.

    A refused format is 415, any other unreadable or unconvertible image 400, ``MemoryError`` 503.
    """
    return _image_errors_as_responses(preprocess_upload, data, spec, budget)
