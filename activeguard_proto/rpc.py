"""What every ActiveGuard gRPC server shares: building the server and mapping errors to status codes.

The bottom layer next to the generated code: it imports gRPC only (never torch, ``activeguard``,
``license_server`` or ``gateway``), so the license server and the gateway can both stand on it
and cannot drift apart in how they bind, report health or end a failed call.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MAX_DETAILS = 1000  # status details travel in a size-capped header: a longer one becomes a transport error
INTERNAL_MESSAGE = "internal error"

# (method, final code, exception or None): counts requests per method and code, or anything else.
ResultHook = Callable[[str, grpc.StatusCode, "BaseException | None"], None]
# ``add_XServicer_to_server`` of a generated module, with its servicer.
Registration = tuple[Callable[[Any, grpc.Server], None], Any]


class Refusal(Exception):
    """Ends an RPC with ``code`` and a message meant for the client (never a traceback or a driver's text)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def clip(message: str, limit: int = MAX_DETAILS) -> str:
    """``message`` cut to ``limit`` characters, so a refusal that echoes client input stays a clean refusal."""
    return message if len(message) <= limit else message[: limit - 1] + "…"


@dataclass
class ErrorMapper:
    """Runs RPC bodies and turns their exceptions into ``context.abort`` calls, in one place.

    ``codes`` maps exception classes (the most derived match wins, by MRO) to a status code, or to
    (code, fixed client message) when the exception's own text must not reach the client. A
    :class:`Refusal` carries its own code; anything else is a bug: INTERNAL "internal error",
    with the traceback in ``logger`` only.
    """

    logger: logging.Logger
    codes: Mapping[type[BaseException], grpc.StatusCode | tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    on_result: ResultHook | None = None

    def refusal_for(self, exc: BaseException) -> Refusal | None:
        """The refusal an expected exception stands for; None for an unexpected one."""
        if isinstance(exc, Refusal):
            return exc
        for cls in type(exc).__mro__:
            entry = self.codes.get(cls)
            if entry is not None:
                code, message = entry if isinstance(entry, tuple) else (entry, str(exc))
                return Refusal(code, message)
        return None

    def run(self, method: str, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        """``fn()``'s reply, or an abort with the mapped code; the hook sees every outcome once."""
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - every failure ends as a status, never a raw exception
            refusal = self._final(method, exc)
            context.abort(refusal.code, clip(refusal.message))
            raise  # unreachable with a real context: abort raises
        self._count(method, grpc.StatusCode.OK, None)
        return result

    def _final(self, method: str, exc: BaseException) -> Refusal:
        """The refusal a failure ends in (INTERNAL for a bug, logged with its traceback), counted once."""
        refusal = self.refusal_for(exc)
        if refusal is None:
            self.logger.error("%s: %s", method, INTERNAL_MESSAGE, exc_info=exc)
            refusal = Refusal(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        self._count(method, refusal.code, exc)
        return refusal

    def _count(self, method: str, code: grpc.StatusCode, exc: BaseException | None) -> None:
        if self.on_result is not None:
            self.on_result(method, code, exc)


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (mTLS when ``client_ca`` is given); None for plaintext."""
    if not (cert and key):
        return None
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(client_ca).read_bytes() if client_ca else None,
        require_client_auth=bool(client_ca),
    )


@dataclass
class BuiltServer:
    """A bound, not yet started gRPC server with its health servicer."""

    server: grpc.Server
    health: health.HealthServicer
    port: int
    service_names: tuple[str, ...]

    def start(self) -> None:
        """Start serving and only then report SERVING, so a health probe never sees a dead port as up."""
        self.server.start()
        for name in ("", *self.service_names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING first (load balancers stop sending), then drain for ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def build_server(
    registrations: Sequence[Registration],
    service_names: Iterable[str],
    *,
    host: str,
    port: int,
    max_workers: int = 16,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    thread_name_prefix: str = "grpc",
    max_receive_bytes: int | None = None,
) -> BuiltServer:
    """A thread-pool gRPC server with the servicers, health and reflection, bound to ``host:port``.

    Raises :class:`OSError` naming the address when it cannot be bound (most often: the port is taken).
    """
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix),
        interceptors=list(interceptors),
        # gRPC's own default is 4 MiB; a service with a larger limit of its own says so here
        options=[("grpc.max_receive_message_length", max_receive_bytes)] if max_receive_bytes else None,
    )
    for add, servicer in registrations:
        add(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(service_names)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = _bind(server, host, port, credentials)
    return BuiltServer(server=server, health=health_servicer, port=bound, service_names=names)


def _bind(
    server: grpc.Server | grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None
) -> int:
    """The bound port; OSError naming the address when it cannot be bound (most often: the port is taken)."""
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # newer gRPC raises instead of returning 0
        bound = 0
    if not bound:
        raise OSError(f"cannot bind gRPC to {address}: the port is taken or the address is not local")
    return bound
