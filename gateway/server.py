"""Run the gateway: gRPC with health checking and reflection, Prometheus on its own port."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from activeguard.processes import write_ready_file
from activeguard_proto.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.service import GatewayConfig, GatewayService

log = logging.getLogger("activeguard.gateway")


def start(config: GatewayConfig, *, host: str = "127.0.0.1", port: int = 0, metrics_port: int = 0,
          workers: int = 16) -> tuple[grpc.Server, GatewayService, int, int]:
    service = GatewayService(config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    gateway_pb2_grpc.add_GatewayServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("activeguard.v1.Gateway", health_pb2.HealthCheckResponse.SERVING)
    names = (gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind the gateway to {host}:{port}")
    metrics_server, _ = start_http_server(metrics_port, addr=host, registry=service.metrics.registry)
    server.start()
    service.sync.start()
    return server, service, bound, metrics_server.server_port


def serve(config: GatewayConfig, *, host: str, port: int, metrics_port: int, ready_file: Path | None) -> int:
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
