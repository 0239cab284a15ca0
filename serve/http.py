"""ASGI middleware of the server: metrics per request and the API key (FastAPI limits the body)."""
import base64
import binascii
import hmac
import json
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OPEN_PATHS = ("/health",)  # reachable without the API key
ERROR_KINDS = {400: "bad_request", 401: "auth", 404: "not_found", 405: "method", 409: "interrupted",
               413: "too_large", 422: "invalid", 429: "queue_full", 499: "disconnected",
               500: "internal", 503: "model", 504: "timeout"}


class Metrics:
    """The server's prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lumen_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.images = Counter("lumen_images", "Images asked for, by endpoint and response status",
                              ["endpoint", "status"], registry=r)
        self.errors = Counter("lumen_errors", "Failed requests by kind of error", ["kind"], registry=r)
        self.queue = Gauge("lumen_queue_images", "Images waiting for a batch", registry=r)
        self.batch_images = Histogram("lumen_batch_images", "Images per UNet call",
                                      buckets=[float(b) for b in range(1, max_batch + 1)], registry=r)
        self.batch_seconds = Histogram("lumen_batch_seconds", "Seconds per UNet call and step update",
                                       buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                                10], registry=r)
        self.queue_wait = Histogram("lumen_queue_wait_seconds",
                                    "Seconds from a request's arrival to its first step",
                                    buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                             10, 30, 60, 120, 300], registry=r)
        self.latency = Histogram("lumen_request_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
                                 registry=r)

    def on_batch(self, images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_seconds.observe(seconds)


async def send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    """A complete JSON response from middleware."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    """OpenAI's error shape, which its client and A1111 clients both print."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class MetricsMiddleware:
    """Counts every request and its images by endpoint and status, and times it."""

    def __init__(self, app, metrics: Metrics, endpoints: tuple[str, ...]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = [500]
        start = time.perf_counter()

        async def record_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, record_status)
        finally:
            labels = (endpoint, str(status[0]))
            self.metrics.requests.labels(*labels).inc()
            images = scope.get("state", {}).get("images")
            if images:
                self.metrics.images.labels(*labels).inc(images)
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            if status[0] >= 400:
                self.metrics.errors.labels(ERROR_KINDS.get(status[0], str(status[0]))).inc()


class AuthMiddleware:
    """The API key on every path but /health, compared in constant time: `Authorization: Bearer
    KEY` (OpenAI clients), or HTTP Basic whose password is KEY (A1111 clients send --api-auth
    credentials this way; the user name is not checked)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    def authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        scheme, token = scheme.lower(), token.strip()
        if scheme == b"basic":
            try:
                token = base64.b64decode(token, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        return scheme in (b"bearer", b"basic") and hmac.compare_digest(token, self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            if not self.authorized(dict(scope["headers"]).get(b"authorization", b"")):
                return await send_json(send, 401, error_body(
                    "missing or wrong API key; expected the header 'Authorization: Bearer KEY' "
                    "(or HTTP Basic auth with KEY as the password)", "authentication_error"),
                    {"www-authenticate": "Bearer"})
        await self.app(scope, receive, send)
