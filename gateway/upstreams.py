"""TorchServe upstreams: round robin over healthy targets, marked down after repeated failures."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc

from activeguard_proto.torchserve import inference_pb2, inference_pb2_grpc
from gateway.errors import UPSTREAM_RETRYABLE


class UpstreamError(Exception):
    """TorchServe did not answer with a body: ``code`` is the last gRPC code, ``tried`` the targets.

    The message names the targets for the gateway's log; clients get a sanitized refusal
    (:func:`gateway.errors.upstream_refusal`) instead.
    """

    def __init__(self, code: grpc.StatusCode, tried: list[str]):
        super().__init__(f"TorchServe failed with {code.name} (tried {', '.join(tried)})")
        self.code, self.tried = code, tried


# One channel per TorchServe, opened at start and kept: its HTTP/2 connection is made before the
# first call and is not dropped when traffic pauses (gRPC's default closes it after 30 idle
# minutes). Keepalive pings stay at TorchServe's (grpc-java's) permitted rate of one per 5 minutes.
CHANNEL_OPTIONS = (
    ("grpc.client_idle_timeout_ms", 2**31 - 1),
    ("grpc.keepalive_time_ms", 300_000),
)


@dataclass
class Upstream:
    target: str
    channel: grpc.Channel = field(init=False)
    stub: inference_pb2_grpc.InferenceAPIsServiceStub = field(init=False)
    failures: int = 0
    down_until: float = 0.0

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        grpc.channel_ready_future(self.channel)  # start connecting now, not on the first request


class UpstreamPool:
    """One model's TorchServe targets. ``call`` retries once, on another target, on UNAVAILABLE."""

    def __init__(
        self,
        model_name: str,
        targets: list[str],
        *,
        deadline_s: float = 10.0,
        max_failures: int = 3,
        down_for_s: float = 5.0,
    ):
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
        """(TorchServe's body, upstream seconds); raises :class:`UpstreamError`.

        A failure that means "this worker or frontend cannot answer now" (worker death, full
        queue, connection refused) is retried once, on another target where there is one, within
        what is left of the one deadline.
        """
        request = inference_pb2.PredictionsRequest(model_name=self.model_name, input=inputs)
        deadline = time.monotonic() + self.deadline_s
        tried: list[str] = []
        upstream = None
        code = grpc.StatusCode.DEADLINE_EXCEEDED
        for _attempt in range(2):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            upstream = self._pick(exclude=upstream)
            tried.append(upstream.target)
            start = time.perf_counter()
            try:
                reply = upstream.stub.Predictions(request, timeout=remaining)
            except grpc.RpcError as err:
                code = err.code()
                if code in UPSTREAM_RETRYABLE or code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._failed(upstream)
                if code in UPSTREAM_RETRYABLE:
                    continue
                raise UpstreamError(code, tried) from None
            upstream.failures = 0
            return reply.prediction, time.perf_counter() - start
        raise UpstreamError(code, tried)

    def _failed(self, upstream: Upstream) -> None:
        upstream.failures += 1
        if upstream.failures >= self.max_failures:
            upstream.down_until = time.monotonic() + self.down_for_s
            upstream.failures = 0

    def close(self) -> None:
        for u in self.upstreams:
            u.channel.close()
