"""TorchServe upstreams: round robin over healthy targets, marked down after repeated failures."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc

from activeguard_proto.torchserve import inference_pb2, inference_pb2_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class UpstreamUnavailable(Exception):
    """No TorchServe answered; the message says which targets were tried."""


@dataclass
class Upstream:
    target: str
    channel: grpc.Channel = field(init=False)
    stub: inference_pb2_grpc.InferenceAPIsServiceStub = field(init=False)
    failures: int = 0
    down_until: float = 0.0

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target)
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)


class UpstreamPool:
    """One model's TorchServe targets. ``call`` retries once, on another target, on UNAVAILABLE."""

    def __init__(self, model_name: str, targets: list[str], *, deadline_s: float = 10.0,
                 max_failures: int = 3, down_for_s: float = 5.0):
        if not targets:
            raise ValueError(f"model {model_name!r} has no TorchServe upstreams")
        self.model_name = model_name
        self.upstreams = [Upstream(t) for t in targets]
        self.deadline_s, self.max_failures, self.down_for_s = deadline_s, max_failures, down_for_s
        self._next = 0
        self._lock = threading.Lock()

    def _pick(self, exclude: Upstream | None = None) -> Upstream:
        with self._lock:
            now = time.monotonic()
            n = len(self.upstreams)
            candidates = [self.upstreams[(self._next + i) % n] for i in range(n)]
            self._next = (self._next + 1) % n
        healthy = [u for u in candidates if u.down_until <= now and u is not exclude]
        return (healthy or [u for u in candidates if u is not exclude] or candidates)[0]

    def up_count(self) -> int:
        now = time.monotonic()
        return sum(u.down_until <= now for u in self.upstreams)

    def predict(self, inputs: dict[str, bytes]) -> tuple[bytes, float]:
        """(TorchServe's body, upstream seconds). Raises UpstreamUnavailable or grpc.RpcError."""
        request = inference_pb2.PredictionsRequest(model_name=self.model_name, input=inputs)
        tried: list[str] = []
        upstream = None
        for _attempt in range(2):
            upstream = self._pick(exclude=upstream)
            tried.append(upstream.target)
            start = time.perf_counter()
            try:
                reply = upstream.stub.Predictions(request, timeout=self.deadline_s)
            except grpc.RpcError as err:
                if err.code() in RETRYABLE or err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._failed(upstream)
                    if err.code() in RETRYABLE:
                        continue
                    raise UpstreamUnavailable(f"TorchServe at {upstream.target} did not answer within "
                                              f"{self.deadline_s:.0f} s") from None
                raise
            upstream.failures = 0
            return reply.prediction, time.perf_counter() - start
        raise UpstreamUnavailable(f"TorchServe is unreachable for model {self.model_name!r} (tried {', '.join(tried)})")

    def _failed(self, upstream: Upstream) -> None:
        upstream.failures += 1
        if upstream.failures >= self.max_failures:
            upstream.down_until = time.monotonic() + self.down_for_s
            upstream.failures = 0

    def close(self) -> None:
        for u in self.upstreams:
            u.channel.close()
