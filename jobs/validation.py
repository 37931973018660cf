"""Turn a POST /api/jobs request into a validated submission, or a clear refusal.

Checks run cheapest first: body size (413), shape of the request, the model name,
priority, then the model's own ``validate`` (400 naming the field and the rule).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.files.uploadedfile import UploadedFile
from django.http import HttpRequest
from PIL import Image

from etcd_broker.core.ops import MAX_PRIORITY  # the top priority (9), defined once

logger = logging.getLogger(__name__)

#: Payload keys that carry an image (the models' input schemas: a data URL, or a grid + width).
IMAGE_KEYS = ("image", "pixels", "width")
#: Key that marks an image in a job's stored input (the bytes live in ``Job.input_file``).
FILE_MARKER = "$file"


class RequestRefused(Exception):
    """The request cannot become a job; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 400,
                 headers: dict[str, str] | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status
        self.headers = headers or {}  # e.g. Retry-After on a 503
        self.details = details or {}  # more JSON for the answer (e.g. the training job)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"error": self.message}
        if self.field:
            data["field"] = self.field
        return {**data, **self.details}


@dataclass
class Submission:
    """A request that passed every check: what ``services.submit`` needs."""

    model: str
    payload: dict[str, Any]
    priority: int
    fingerprint: str
    summary: dict[str, Any]
    image: bytes | None = None
    image_name: str = ""


def models() -> dict[str, Any]:
    """The model registry (``ml.registry.MODELS``); imported lazily, TensorFlow-free."""
    from ml.registry import MODELS

    return MODELS


def describe_model(spec: Any, active: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of GET /api/models: the spec, whether it can run here and if not, why, and its
    readiness (``jobs.training.readiness``: state, model card, training job); ``active`` is
    ``jobs.training.active_training()`` when the caller describes several models."""
    from jobs import training

    ok, reason = spec.available(settings.MODEL_DIR)
    active = training.active_training() if active is None else active
    return {**spec.to_dict(), "available": bool(ok), "unavailable_reason": None if ok else reason,
            **training.readiness(spec, active, training.ready_in(active))}


def describe_models() -> list[dict[str, Any]]:
    """Every model, described with one query for the training jobs."""
    from jobs.training import active_training

    active = active_training()
    return [describe_model(spec, active) for spec in models().values()]


def check_body_size(request: HttpRequest) -> None:
    """413 before reading a body larger than JOBS_MAX_REQUEST_BYTES."""
    limit = settings.JOBS_MAX_REQUEST_BYTES
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise RequestRefused("Content-Length is not a number") from None
    if length > limit:
        raise RequestRefused(f"request body is {length} bytes; the limit is {limit} bytes", status=413)


def parse_submission(request: HttpRequest) -> Submission:
    """Read, check and validate a submission; raises RequestRefused."""
    check_body_size(request)
    try:
        body, upload = _read_body(request)
    except RequestDataTooBig:
        raise RequestRefused(
            f"request body is over the limit of {settings.JOBS_MAX_REQUEST_BYTES} bytes", status=413,
        ) from None
    unknown = sorted(set(body) - {"model", "input", "priority"})
    if unknown:
        raise RequestRefused(f"unknown field(s) {unknown}; expected model, input, priority", field=unknown[0])
    spec = lookup_model(body.get("model"))
    priority = parse_priority(body.get("priority"), request.user)
    payload = body.get("input", {})
    if not isinstance(payload, dict):
        raise RequestRefused("input must be a JSON object", field="input")
    original = None
    if upload is not None:
        original = read_upload(upload)
        payload = {**payload, upload.field_name: upload_data_url(upload.field_name, original)}
    return prepare(spec, payload, priority, original=original, image_name=upload.name if upload else "")


def prepare(spec: Any, payload: dict[str, Any], priority: int, *, original: bytes | None = None,
            image_name: str = "") -> Submission:
    """Validate ``payload`` for ``spec`` and split it into what is stored and what is sent.

    An image (``image`` data URL or a ``pixels`` grid) is kept as the job's file (``original``,
    the upload as sent, if given) and reaches the worker as a greyscale ``pixels`` grid of at
    most ml.images.REDUCED_SIDE a side: images never travel through etcd.
    """
    validated = validate_input(spec, payload)
    url = _image_url(validated)
    if url is None:
        return Submission(model=spec.name, payload=validated, priority=priority,
                          fingerprint=fingerprint(validated), summary=validated)
    rest = {k: v for k, v in validated.items() if k not in IMAGE_KEYS}
    sent = validate_reduced(spec, rest, reduce_image("image", url), "image" if "image" in validated else "pixels")
    image = original or base64.b64decode(url.split(",", 1)[1])
    summary = {**rest, "image": {FILE_MARKER: url[5:].split(";", 1)[0], "bytes": len(image)}}
    return Submission(model=spec.name, payload=sent, priority=priority, fingerprint=fingerprint(sent),
                      summary=summary, image=image, image_name=image_name)


def _image_url(payload: dict[str, Any]) -> str | None:
    """The payload's image as a data URL: ``image`` itself, or ``pixels`` drawn as a PNG."""
    if isinstance(payload.get("image"), str):
        return payload["image"]
    if not isinstance(payload.get("pixels"), list):
        return None
    ink = np.asarray(payload["pixels"], dtype=np.float32)
    width = int(payload.get("width") or round(ink.size ** 0.5))
    grey = np.clip(255.0 * (1.0 - ink.reshape(-1, width)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="PNG")
    return data_url(buffer.getvalue(), "image/png")


def _read_body(request: HttpRequest) -> tuple[dict[str, Any], UploadedFile | None]:
    content_type = request.content_type or ""
    if content_type == "application/json":
        body = parse_json(request.body or b"{}", "body")
        if not isinstance(body, dict):
            raise RequestRefused("body must be a JSON object: {\"model\": ..., \"input\": {...}}")
        return body, None
    if content_type == "multipart/form-data":
        return _read_multipart(request)
    raise RequestRefused(
        f"Content-Type {content_type or '(none)'} is not accepted; send application/json, "
        "or multipart/form-data with an image file", status=415,
    )


def parse_json(raw: bytes | str, what: str, field: str | None = None) -> Any:
    """A client's JSON; every way it can be unreadable is a 400 (bad syntax or encoding, NaN or
    Infinity, integers over Python's 4300 digits, nesting deeper than the parser's recursion)."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestRefused(f"{what} is not valid JSON: nested too deeply", field=field) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
        raise RequestRefused(f"{what} is not valid JSON: {exc}", field=field) from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _read_multipart(request: HttpRequest) -> tuple[dict[str, Any], UploadedFile | None]:
    body: dict[str, Any] = {k: request.POST.get(k) for k in request.POST if k != "csrfmiddlewaretoken"}
    if "input" in body:
        body["input"] = parse_json(body["input"] or "{}", "input", field="input")
    files = list(request.FILES.values())
    if len(files) > 1:
        raise RequestRefused("send one image file per job", field=files[1].field_name)
    upload = files[0] if files else None
    if upload is not None:
        upload.field_name = next(name for name in request.FILES)
    return body, upload


def lookup_model(name: Any) -> Any:
    registry = models()
    if not isinstance(name, str) or not name:
        raise RequestRefused(f"model is required: one of {', '.join(registry)}", field="model")
    spec = registry.get(name)
    if spec is None:
        raise RequestRefused(f"unknown model {name!r}; choose one of {', '.join(registry)}", field="model")
    ok, reason = spec.available(settings.MODEL_DIR)
    if not ok:
        raise RequestRefused(f"model {name!r} is unavailable: {reason}", field="model", status=503)
    from jobs.training import refuse_while_training

    refuse_while_training(spec)
    return spec


def parse_priority(value: Any, user: Any) -> int:
    if value is None or value == "":
        return settings.JOBS_DEFAULT_PRIORITY
    top = MAX_PRIORITY if getattr(user, "is_staff", False) else settings.JOBS_MAX_PRIORITY_NON_STAFF
    try:
        if isinstance(value, bool | float):  # before int(): int(1e400) raises OverflowError
            raise ValueError
        priority = int(value)
        if str(priority) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise RequestRefused(f"priority must be a whole number from 0 to {top}", field="priority") from None
    if not 0 <= priority <= top:
        hint = " (higher needs a staff account)" if top < MAX_PRIORITY and priority <= MAX_PRIORITY else ""
        raise RequestRefused(f"priority must be from 0 to {top}{hint}; got {priority}", field="priority")
    return priority


def validate_input(spec: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """The model's own check; its InvalidInput becomes a 400 naming ``input.<field>``."""
    from ml.errors import InvalidInput

    try:
        return spec.validate(payload)
    except InvalidInput as exc:
        name = "input" if exc.field in ("payload", "input", "") else f"input.{exc.field}"
        raise RequestRefused(f"{name}: {exc.message}", field=name) from None


def validate_reduced(spec: Any, rest: dict[str, Any], grid: dict[str, Any], source: str) -> dict[str, Any]:
    """The reduced grid through the model's check; a refusal names the field the client sent."""
    from ml.errors import InvalidInput

    try:
        return spec.validate({**rest, **grid})
    except InvalidInput as exc:
        size = f"{grid['width']}x{len(grid['pixels']) // grid['width']}"
        raise RequestRefused(f"input.{source}: {exc.message} (once reduced to the {size} grid the model is sent)",
                             field=f"input.{source}") from None


def read_upload(upload: UploadedFile) -> bytes:
    limit = settings.JOBS_MAX_REQUEST_BYTES
    if upload.size is not None and upload.size > limit:
        raise RequestRefused(f"input.{upload.field_name}: file is {upload.size} bytes; the limit is {limit} bytes",
                             field=f"input.{upload.field_name}", status=413)
    return upload.read()


def upload_data_url(field_name: str, raw: bytes) -> str:
    """An uploaded photo, shrunk to the size the models' checks accept, as a PNG data URL."""
    from ml.errors import InvalidInput
    from ml.images import image_to_data_url

    try:
        return image_to_data_url(raw)
    except InvalidInput as exc:
        raise RequestRefused(f"input.{field_name}: {exc.message}", field=f"input.{field_name}") from None


def reduce_image(field_name: str, url: str) -> dict[str, Any]:
    """A data URL as ``{"pixels": [...], "width": w}``: greyscale, 1 = dark, at most
    REDUCED_SIDE pixels a side. The models' checks treat it exactly as the image."""
    from ml.images import decode_data_url, reduce_to_pixels

    return reduce_to_pixels(decode_data_url(field_name, url))


def data_url(content: bytes, content_type: str | None) -> str:
    return f"data:{content_type or 'application/octet-stream'};base64,{base64.b64encode(content).decode()}"


def fingerprint(payload: dict[str, Any]) -> str:
    """sha256 of the validated input in canonical JSON: identical requests, identical prints."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    """The input as stored on the Job: an inline image becomes ``{"$file": type, "bytes": n}``
    (the image itself goes to the job's ``input_file``); everything else is kept, since the
    model's limits already bound it."""
    return {key: _summarize_value(value) for key, value in payload.items()}


def _summarize_value(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("data:") and ";base64," in value:
        head, encoded = value.split(",", 1)
        return {FILE_MARKER: head[5:].split(";", 1)[0], "bytes": len(encoded) * 3 // 4}
    return value


def rebuild_payload(summary: dict[str, Any], image: bytes | None) -> dict[str, Any]:
    """The payload a job was submitted with, from its summary and its input file (for retry)."""
    payload = {}
    for key, value in summary.items():
        if isinstance(value, dict) and FILE_MARKER in value:
            if image is None:
                raise RequestRefused(f"the input file of {key!r} is gone", field=f"input.{key}")
            value = upload_data_url(key, image)
        payload[key] = value
    return payload
