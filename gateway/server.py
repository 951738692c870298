"""Run the gateway: gRPC with health checking and reflection, Prometheus on its own port."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import grpc
from prometheus_client import start_http_server

from activeguard.runtime.processes import write_ready_file
from activeguard_proto.rpc import build_server
from activeguard_proto.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.service import GatewayConfig, GatewayService

log = logging.getLogger("activeguard.gateway")
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


def start(
    config: GatewayConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    metrics_port: int | None = None,
    workers: int = 16,
) -> tuple[grpc.Server, GatewayService, int, int]:
    """Start the gateway; ``metrics_port`` None means the config's ``metrics_port`` (0: any free port)."""
    if metrics_port is None:
        metrics_port = config.metrics_port
    service = GatewayService(config)
    built = build_server(
        [(gateway_pb2_grpc.add_GatewayServicer_to_server, service)],
        [SERVICE_NAME],
        host=host,
        port=port,
        max_workers=workers,
        thread_name_prefix="gateway",
        # room for the largest payload Predict forwards (its own check answers INVALID_ARGUMENT), plus framing
        max_receive_bytes=config.max_payload_bytes + 1024 * 1024,
    )
    metrics_server, _ = start_http_server(metrics_port, addr=host, registry=service.metrics.registry)
    built.start()
    service.sync.start()
    return built.server, service, built.port, metrics_server.server_port


def serve(config: GatewayConfig, *, host: str, port: int, metrics_port: int | None, ready_file: Path | None) -> int:
    server, service, bound, mport = start(config, host=host, port=port, metrics_port=metrics_port)
    log.info("gateway listening on %s:%d (metrics %d)", host, bound, mport)
    if ready_file:
        write_ready_file(ready_file, {"port": bound, "metrics_port": mport})
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    server.stop(grace=2).wait()
    service.close()
    return 0
