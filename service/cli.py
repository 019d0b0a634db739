"""The service stage's subcommand: `pod serve`. `register` only declares flags (no FastAPI, pydantic or
onnxruntime import); the server's modules load when it runs."""

from __future__ import annotations

import argparse
import json

from pod.recommender import TOPN_PROMPT_HELP, TOPN_PROMPTS  # numpy only; `pod` builds the train parser with it too

SERVE_DEFAULTS: dict[str, object] = {
    "runtime": "onnx",
    "host": "127.0.0.1",
    "port": 8000,
    "max_batch_size": 16,
    "max_wait_ms": 5.0,
    "max_queue": 256,
    "max_in_flight": 0,
    "request_timeout_s": 10.0,
    "threads": 0,
    "normalizer": "exact",
    "topn_prompt": "auto",
    "provider": "auto",
    "device": "auto",
    "log_level": "info",
    "tracing": False,
}
"""`service.settings.ServeSettings`'s defaults, written out for the help text: `pod serve` flags default to None
so that the `POD_*` environment, then ServeSettings, decide (tests/test_cli.py keeps the two equal)."""


def _default(name: str) -> str:
    return f"(default: {SERVE_DEFAULTS[name]}; env POD_{name.upper()})"


def _report_startup_failure(app, failure: list[BaseException], quiet: bool):
    """`app` (ASGI) keeping the exception that stopped its start-up (a missing or damaged bundle, a missing
    checkpoint) in `failure`, for `pod: error:`; `quiet` also keeps the server from logging its traceback."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        started = False

        async def forward(message):
            nonlocal started
            if message["type"] == "lifespan.startup.complete":
                started = True
            elif message["type"] == "lifespan.startup.failed" and quiet:
                message = {**message, "message": ""}
            await send(message)

        try:
            await app(scope, receive, forward)
        except Exception as exc:
            if not started:
                failure.append(exc)
            raise

    return wrapped


def _serve(args: argparse.Namespace) -> None:
    import logging

    import uvicorn

    from service.app import create_app, setup_logging
    from service.settings import ServeSettings

    overrides = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    settings = ServeSettings(**overrides)
    setup_logging(settings.log_level)
    print("pod serve settings: " + json.dumps(settings.model_dump(mode="json")), flush=True)  # the token masked
    if getattr(args, "ray", False):
        return _serve_ray(args, settings)
    debug = getattr(args, "debug", False)
    failure: list[BaseException] = []
    app = _report_startup_failure(create_app(settings), failure, quiet=not debug)
    server_log = logging.getLogger("uvicorn.error")
    said_below = _DropStartupFailed()  # the `pod: error:` line says it
    server_log.addFilter(said_below)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        )
    except SystemExit:  # uvicorn's exit when start-up fails
        if failure:
            raise failure[0] from None
        raise
    finally:
        server_log.removeFilter(said_below)
    if failure:
        raise failure[0]


def _serve_ray(args: argparse.Namespace, settings) -> None:
    """`pod serve --ray`: the same app in Ray Serve replicas behind Ray's HTTP proxy (service/ray_deployment.py)."""
    from pod.cli import UsageError

    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise UsageError(
            "--replicas (a fixed number) and --min-replicas/--max-replicas (autoscaling) exclude each other"
        )
    from service.ray_deployment import RayOptions, run  # Ray only now: the plain server never imports it

    given = {
        "address": args.ray_address,
        "replicas": args.replicas,
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing_requests,
        "max_ongoing_requests": args.max_ongoing_requests,
        "replica_cpus": args.replica_cpus,
    }
    run(settings, RayOptions(**{k: v for k, v in given.items() if v is not None}))


class _DropStartupFailed:
    """A logging filter: drops uvicorn's "Application startup failed. Exiting." line."""

    def filter(self, record) -> bool:
        return not record.getMessage().startswith("Application startup failed")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `pod` command's subparsers."""
    d = _default
    sv = sub.add_parser(
        "serve",
        help="serve a bundle (ONNX Runtime) or a checkpoint (PyTorch) over HTTP",
        description="Serve a bundle (ONNX Runtime, no torch needed) or a checkpoint (PyTorch) over HTTP. Every "
        "flag can also be set by its POD_* environment variable (see service/settings.py); flags win.",
    )
    sv.add_argument("--bundle", help="bundle directory from `pod export` (env POD_BUNDLE)")
    sv.add_argument("--runtime", choices=["onnx", "torch"], help=f"onnx: a bundle; torch: a checkpoint {d('runtime')}")
    sv.add_argument("--checkpoint", help="checkpoint for --runtime torch (env POD_CHECKPOINT)")
    sv.add_argument("--host", help=f"address to listen on {d('host')}")
    sv.add_argument("--port", type=int, help=f"port to listen on {d('port')}")
    sv.add_argument(
        "--max-batch-size", type=int, dest="max_batch_size", help=f"a batch closes at this size {d('max_batch_size')}"
    )
    sv.add_argument(
        "--max-wait-ms",
        type=float,
        dest="max_wait_ms",
        help=f"... or when its first job has waited this long {d('max_wait_ms')}",
    )
    sv.add_argument(
        "--max-queue", type=int, dest="max_queue", help=f"queued jobs per task; past it, 429 {d('max_queue')}"
    )
    sv.add_argument(
        "--max-in-flight",
        type=int,
        dest="max_in_flight",
        help="requests per task past the door and not yet answered; past it, 429 before the body is read "
        f"(0: no limit but the queue's) {d('max_in_flight')}",
    )
    sv.add_argument(
        "--request-timeout-s",
        type=float,
        dest="request_timeout_s",
        help=f"per-request deadline; past it, 504 {d('request_timeout_s')}",
    )
    sv.add_argument("--threads", type=int, help=f"ONNX Runtime intra-op threads, 0: its default {d('threads')}")
    sv.add_argument(
        "--normalizer",
        choices=["exact", "allowed"],
        help=f"item scores: exact log-probabilities, or renormalized over valid ID tokens (faster) {d('normalizer')}",
    )
    sv.add_argument(
        "--topn-prompt",
        dest="topn_prompt",
        choices=list(TOPN_PROMPTS),
        help=f"{TOPN_PROMPT_HELP} {d('topn_prompt')}",
    )
    sv.add_argument("--provider", help=f"ONNX Runtime provider: auto, cpu, cuda {d('provider')}")
    sv.add_argument("--device", help=f"PyTorch device: auto, cpu, cuda {d('device')}")
    sv.add_argument("--log-level", dest="log_level", help=f"log level {d('log_level')}")
    sv.add_argument(
        "--tracing",
        action="store_true",
        default=None,
        help="send OpenTelemetry spans (request, queue wait, batch, encoder, decoder steps, search) over OTLP/HTTP to "
        f"$OTEL_EXPORTER_OTLP_ENDPOINT (else http://localhost:4318) {d('tracing')}",
    )
    sv.add_argument(
        "--availability-file",
        dest="availability_file",
        help="JSON list of unavailable item IDs, kept across restarts; POST /admin/availability writes it "
        "(env POD_AVAILABILITY_FILE)",
    )
    sv.add_argument(
        "--api-token",
        dest="api_token",
        help="bearer token for the recommendation endpoints; prefer env POD_API_TOKEN (flags show in `ps`)",
    )
    ray = sv.add_argument_group(
        "Ray Serve (pip install 'pod-rec[ray]')",
        "--ray serves the same app from Ray Serve replicas behind Ray's HTTP proxy on --host/--port; each "
        "replica loads the bundle (at the same path on every node) and runs its own batcher. See docs/DEPLOY.md.",
    )
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve instead of one uvicorn process")
    ray.add_argument(
        "--ray-address",
        dest="ray_address",
        help="an existing Ray cluster to deploy on (HOST:PORT, auto, ray://HOST:10001); default: start a local one",
    )
    ray.add_argument("--replicas", type=int, help="a fixed number of replicas (default: autoscale, below)")
    ray.add_argument("--min-replicas", type=int, dest="min_replicas", help="autoscaling: fewest replicas (default: 1)")
    ray.add_argument("--max-replicas", type=int, dest="max_replicas", help="autoscaling: most replicas (default: 2)")
    ray.add_argument(
        "--target-ongoing-requests",
        type=float,
        dest="target_ongoing_requests",
        help="autoscaling: requests in flight per replica to aim at (default: 16, one full batch)",
    )
    ray.add_argument(
        "--max-ongoing-requests",
        type=int,
        dest="max_ongoing_requests",
        help="requests in flight per replica; the proxy queues the rest (default: 64)",
    )
    ray.add_argument(
        "--replica-cpus",
        type=float,
        dest="replica_cpus",
        help="Ray CPUs per replica, also ONNX Runtime threads when --threads is 0 (default: 1)",
    )
    sv.set_defaults(func=_serve)
