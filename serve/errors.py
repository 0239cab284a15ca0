"""Exceptions -> HTTP responses. User input gives 4xx naming the field; the model's failures 503."""
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lumen.engine import LumenError

from .jobs import Interrupted, ModelError, QueueFullError
from .http import error_body
from .schemas import InvalidRequest

# Engine argument names -> the request field that set them, per endpoint.
A1111_FIELDS = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "sampler": "sampler_name",
                "timestep_spacing": "scheduler"}
OPENAI_FIELDS = {"height": "size", "width": "size"}


class Disconnected(Exception):
    """The client went away before its images were ready."""


class NotServed(Exception):
    """An AUTOMATIC1111 endpoint for a feature this server does not have."""


def engine_param(message: str, path: str) -> tuple[str | None, str]:
    """(request field, message in that field's name) of an engine error message."""
    names = A1111_FIELDS if path.startswith("/sdapi") else OPENAI_FIELDS
    match = re.match(r"(\w+)[=:\s]", message)
    name = match[1] if match else None
    if name in names:
        return names[name], names[name] + message[len(name):]
    if name in ("prompt", "negative_prompt", "unknown", "prompts", "negative"):
        return ("negative_prompt" if "negative" in message[:30] else "prompt"), message
    return name, message


async def invalid_body(request: Request, err: RequestValidationError):
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request body"}
    if first.get("type") == "json_invalid":
        param, message = None, f"request body is not valid JSON ({first.get('ctx', {}).get('error')})"
    else:
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
    body = error_body(message, "invalid_request_error", param)
    body["detail"] = [{k: e.get(k) for k in ("loc", "msg", "type")} for e in err.errors()]
    return JSONResponse(body, status_code=422)


async def invalid_request(request: Request, err: InvalidRequest):
    return JSONResponse(error_body(str(err), "invalid_request_error", err.param), status_code=422)


async def engine_error(request: Request, err: LumenError):
    if not isinstance(err, (ValueError, TypeError)):  # e.g. a backend that cannot run
        return JSONResponse(error_body(str(err), "server_error"), status_code=503)
    param, message = engine_param(str(err), request.url.path)
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=422)


async def queue_full(request: Request, err: QueueFullError):
    return JSONResponse(error_body(f"server busy: {err}; retry later", "rate_limit_error"),
                        status_code=429, headers={"Retry-After": str(err.retry_after)})


async def timed_out(request: Request, err: TimeoutError):
    return JSONResponse(error_body(str(err), "timeout_error"), status_code=504)


async def model_failed(request: Request, err: ModelError):
    return JSONResponse(error_body(f"the model failed: {err}", "server_error"), status_code=503)


async def disconnected(request: Request, err: Disconnected):
    return JSONResponse(error_body(str(err), "disconnected"), status_code=499)


async def http_error(request: Request, err: HTTPException):
    message = str(err.detail)
    if err.status_code == 404 and message == "Not Found":  # no route: say which
        message = f"{request.method} {request.url.path} is not an endpoint of this server"
    return JSONResponse(error_body(message, "invalid_request_error"),
                        status_code=err.status_code, headers=err.headers)


async def not_served(request: Request, err: NotServed):
    return JSONResponse(error_body(str(err), "not_found_error"), status_code=404)


async def interrupted(request: Request, err: Interrupted):
    return JSONResponse(error_body(str(err), "interrupted"), status_code=409)


HANDLERS = {RequestValidationError: invalid_body, InvalidRequest: invalid_request,
            LumenError: engine_error, QueueFullError: queue_full, TimeoutError: timed_out,
            ModelError: model_failed, Disconnected: disconnected, HTTPException: http_error,
            NotServed: not_served, Interrupted: interrupted}


def install(app: FastAPI) -> None:
    """Register the handlers: every refusal is JSON in OpenAI's error shape."""
    for exception, handler in HANDLERS.items():
        app.add_exception_handler(exception, handler)
