"""`pod serve --ray`: the same service as `pod serve`, as a Ray Serve deployment (issue 16).

Each replica is a Ray actor that builds the app `pod serve` builds (`service.app.create_app`) and runs its
lifespan, as uvicorn would: it loads and checks the bundle, starts our batcher and model thread, warms up, and
only then counts as started. Ray Serve's HTTP proxy spreads requests over the replicas, restarts a replica that
dies or fails its health check (`/readyz`'s condition), and scales between `min_replicas` and `max_replicas`
on the requests each replica has in flight (`target_ongoing_requests`). Everything behind the proxy is ours:
validation, admission (429/504), metrics, the token.

Batching inside a replica: our batcher (default), or `batching="serve"`, Ray Serve's `@serve.batch` fed by the
same routes and model call, kept to measure the two (docs/DEPLOY.md). `simulate_ms` adds a fixed sleep to each
batch, a replica whose model step waits instead of computing, to show scaling where the cores are too few
(reliability/ray_replica_loss.py).

Ray is imported only here, and `pod serve` imports this module only with `--ray`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pod.cli import UsageError

try:
    import ray
    from ray import serve
except ImportError as exc:  # the `ray` extra is not installed
    raise UsageError(f"--ray needs Ray Serve ({exc}): pip install 'pod-rec[ray]'") from None

APP = "pod"
REPLICA_HEADER = "x-pod-replica"  # which replica answered (its Ray Serve id), on every response


@dataclass
class RayOptions:
    address: str | None = None  # an existing cluster ("HOST:PORT", "auto", "ray://..."); None: a local one
    replicas: int | None = None  # fixed number; None: autoscale between min and max
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 16.0  # per replica, what autoscaling aims at (a full batch)
    max_ongoing_requests: int = 64  # per replica; the proxy queues the rest (Ray's default, 5, starves batches)
    replica_cpus: float = 1.0  # Ray CPUs per replica; also ONNX Runtime's threads when --threads is 0
    batching: str = "pod"  # "pod": our batcher; "serve": Ray Serve's @serve.batch (for measurement)
    simulate_ms: float = 0.0  # > 0: each batch also sleeps this long (a replica not bound by the CPU)


def _slowed(run: Callable[[Sequence[Any]], list], seconds: float) -> Callable[[Sequence[Any]], list]:
    def run_slowly(batch: Sequence[Any]) -> list:
        time.sleep(seconds)
        return run(batch)

    return run_slowly


class ServeBatched:
    """A task's queue for the app's routes (what `service.admission.Queue` needs) whose batches Ray Serve's
    `@serve.batch` forms. No length buckets and no model generations in a batch key: for measuring the batching
    only, not for serving swaps."""

    def __init__(self, name: str, run: Callable, settings: Any, executor: ThreadPoolExecutor, on_batch: Callable):
        self.name, self.run, self.executor, self.on_batch = name, run, executor, on_batch
        self.max_queue = settings.max_queue
        self.running = 0
        self.tasks: set[asyncio.Future] = set()
        wait_s = settings.max_wait_ms / 1000
        self.batched = serve.batch(max_batch_size=settings.max_batch_size, batch_wait_timeout_s=wait_s)(self._batch)

    @property
    def depth(self) -> int:
        return max(len(self.tasks) - self.running, 0)

    async def _batch(self, payloads: list) -> list:
        self.running = len(payloads)
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.run, payloads)
        finally:
            self.running = 0
            self.on_batch(self.name, len(payloads), time.perf_counter() - started, [0.0] * len(payloads))

    def submit(self, payload: Any, bucket: Any = 0) -> asyncio.Future:
        from service.batcher import QueueFull

        if self.depth >= self.max_queue:
            raise QueueFull(f"{self.name} queue is full ({self.max_queue} waiting)")
        task = asyncio.ensure_future(self.batched(payload))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        while self.tasks:
            await asyncio.sleep(0.01)


def _adjust(app: Any, batching: str, simulate_ms: float) -> None:
    """Run after the app's own start-up: swap in `@serve.batch` queues and/or the simulated model time."""
    from service.models import run_batch

    state = app.state
    if batching == "serve":
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pod-serve-batch")  # one model thread
        hooks = (state.metrics.on_batch, state.admission.throughput.on_batch)
        on_batch = lambda *b: [hook(*b) for hook in hooks]  # noqa: E731
        methods = {"sequential": "sequential", "topn": "topn", "explanation": "explain"}
        for task, method in methods.items():
            run = run_batch(method, task)
            if simulate_ms:
                run = _slowed(run, simulate_ms / 1000)
            state.batchers[task] = ServeBatched(task, run, state.settings, executor, on_batch)
    elif simulate_ms:
        for batcher in state.batchers.values():
            batcher.run_batch = _slowed(batcher.run_batch, simulate_ms / 1000)


class Tag:
    """Names the replica that answered in a response header (plain ASGI: nothing rebuilt, cheap)."""

    def __init__(self, app: Any, value: bytes) -> None:
        self.app, self.value = app, value

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":  # Ray's proxy sets x-request-id itself (the same id)
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)


@serve.ingress()  # the app is built in each replica (`__serve_build_asgi_app__`), lifespan included
class PodReplica:
    def __init__(self, settings: dict, batching: str = "pod", simulate_ms: float = 0.0) -> None:
        from service.settings import ServeSettings

        self.settings = ServeSettings(**settings)  # POD_API_TOKEN comes from the node's environment
        self.batching, self.simulate_ms = batching, simulate_ms

    def __serve_build_asgi_app__(self) -> Any:
        from service.app import create_app, setup_logging

        setup_logging(self.settings.log_level)
        app = create_app(self.settings)
        inner, batching, simulate_ms = app.router.lifespan_context, self.batching, self.simulate_ms

        @asynccontextmanager
        async def lifespan(app: Any):
            async with inner(app):
                _adjust(app, batching, simulate_ms)
                yield

        app.router.lifespan_context = lifespan
        app.add_middleware(Tag, value=serve.get_replica_context().replica_id.unique_id.encode())
        return app

    def check_health(self) -> None:
        """Ray Serve calls this every few seconds; raising marks the replica unhealthy and replaces it."""
        if not getattr(self.app.state, "ready", False):
            raise RuntimeError("the model is not loaded and warm")


def application(settings: Any, opts: RayOptions) -> serve.Application:
    """The Serve application for these settings: one deployment, `PodReplica`, scaled as `opts` says."""
    if opts.replicas is not None and opts.replicas < 1:
        raise UsageError("--replicas must be at least 1")
    if opts.replicas is None and not 0 <= opts.min_replicas <= opts.max_replicas or opts.max_replicas < 1:
        raise UsageError("--min-replicas and --max-replicas: need 0 <= min <= max and max >= 1")
    if opts.max_ongoing_requests < 1 or opts.target_ongoing_requests <= 0:
        raise UsageError("--max-ongoing-requests and --target-ongoing-requests must be positive")
    if opts.batching not in ("pod", "serve"):
        raise UsageError(f"batching must be 'pod' or 'serve', not {opts.batching!r}")
    fields = settings.model_dump(exclude={"api_token"})  # never through Ray's config: read from the environment
    if settings.bundle:
        fields["bundle"] = str(Path(settings.bundle).resolve())  # every node needs it at this same path
    if settings.checkpoint:
        fields["checkpoint"] = str(Path(settings.checkpoint).resolve())
    if not settings.threads:
        fields["threads"] = max(1, round(opts.replica_cpus))  # ONNX Runtime would size its pool from the node
    scaling: dict[str, Any]
    if opts.replicas is not None:
        scaling = {"num_replicas": opts.replicas}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": opts.min_replicas,
                "max_replicas": opts.max_replicas,
                "target_ongoing_requests": opts.target_ongoing_requests,
            }
        }
    deployment = serve.deployment(
        PodReplica,
        name="PodReplica",
        max_ongoing_requests=opts.max_ongoing_requests,
        ray_actor_options={"num_cpus": opts.replica_cpus},
        graceful_shutdown_timeout_s=settings.request_timeout_s + 5,  # finish what was admitted, as SIGTERM does
        health_check_period_s=2,
        # Ray's own replica logs at our level; its per-request access log only at info or debug (costly under load)
        logging_config={
            "log_level": settings.log_level.upper(),
            "enable_access_log": settings.log_level.lower() in ("debug", "info"),
        },
        **scaling,
    )
    return deployment.bind(fields, opts.batching, opts.simulate_ms)


def deploy(settings: Any, opts: RayOptions) -> str:
    """Start Serve's HTTP proxy on `settings.host:port` (on the cluster Ray is connected to) and deploy; returns
    the proxy's URL once every replica is started (loaded and warm)."""
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings, opts), name=APP, route_prefix="/")
    return f"http://{settings.host}:{settings.port}"


def check_bundle(settings: Any) -> None:
    """Fail here, with the usual message, rather than in replicas that Serve would restart again and again."""
    if settings.runtime == "onnx":
        if not settings.bundle:
            raise UsageError("no bundle: pass --bundle DIR (a `pod export` directory) or set POD_BUNDLE")
        if not (Path(settings.bundle) / "bundle.json").is_file():
            raise FileNotFoundError(f"{Path(settings.bundle) / 'bundle.json'}: missing; is it a `pod export` bundle?")
    elif not settings.checkpoint:
        raise UsageError("--runtime torch needs --checkpoint DIR (or POD_CHECKPOINT)")


def run(settings: Any, opts: RayOptions) -> None:
    """`pod serve --ray`: connect to (or start) a cluster, deploy, serve until SIGINT/SIGTERM, then delete the
    application (replicas finish what they admitted) and stop what this command started."""
    check_bundle(settings)
    local = opts.address is None
    if settings.api_token is not None:  # replicas read it from their environment, never from Ray's config
        if local:
            os.environ["POD_API_TOKEN"] = settings.api_token.get_secret_value()  # the local nodes inherit it
        else:
            print("pod serve --ray: replicas read the token from POD_API_TOKEN on their Ray node", flush=True)
    ray.init(address="local" if local else opts.address, log_to_driver=local)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = deploy(settings, opts)
        scale = f"{opts.replicas} replicas" if opts.replicas else f"{opts.min_replicas} to {opts.max_replicas} replicas"
        print(f"pod serve --ray: ready on {url} ({scale}, Ray {ray.__version__})", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            serve.delete(APP)
            if local:
                serve.shutdown()
        finally:
            ray.shutdown()
