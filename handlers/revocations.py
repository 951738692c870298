"""The license server's signed revocation list, fetched over gRPC from inside a TorchServe worker.

The list is signed (:mod:`activeguard.credentials.revocations`), so the channel needs no trust: the
worker verifies every list it gets and keeps the last good one when the server cannot be reached.
"""

from __future__ import annotations

import grpc

from activeguard_proto.v1 import license_pb2, license_pb2_grpc

FETCH_TIMEOUT_S = 3.0


class ServerFetch:
    """Callable: the signed list's text for ``model_id`` from the license server at ``target`` (host:port)."""

    def __init__(self, target: str, model_id: str):
        self.target, self.model_id = target, model_id
        self.name = f"license server {target}"
        self._channel = grpc.insecure_channel(target)
        self._stub = license_pb2_grpc.LicenseServiceStub(self._channel)

    def __call__(self) -> str:
        request = license_pb2.GetRevocationListRequest(model_id=self.model_id)
        return self._stub.GetRevocationList(request, timeout=FETCH_TIMEOUT_S).text

    def close(self) -> None:
        self._channel.close()
