"""Gateway parts that need no server: limits, upstream failover, revocation sync, tensor codec."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from activeguard_proto.v1 import gateway_pb2
from gateway.service import GatewayConfig, Limits, Metrics, ModelRoute, Refusal, RevocationSync
from gateway.tensors import from_tensor, to_tensor
from gateway.upstreams import UpstreamPool, UpstreamUnavailable
from handlers.server import free_port


def test_rate_and_session_limits():
    limits = Limits(rate_per_s=3, max_sessions=2)
    for _ in range(3):
        limits.admit_call("alice")
    with pytest.raises(Refusal) as info:
        limits.admit_call("alice")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    limits.admit_call("bob")  # limits are per user
    import time

    limits.add_session("alice", "s1", time.time() + 60)
    limits.add_session("alice", "s2", time.time() + 60)
    with pytest.raises(Refusal, match="active sessions"):
        limits.add_session("alice", "s3", time.time() + 60)
    limits.add_session("carol", "s4", time.time() - 1)  # already expired: does not count
    assert limits.active_sessions() == 2


def test_upstream_pool_round_robin_retry_and_mark_down():
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    pool = UpstreamPool("m", dead, deadline_s=2, max_failures=2, down_for_s=60)
    with pytest.raises(UpstreamUnavailable) as info:
        pool.predict({"data": b"{}"})
    assert all(t in str(info.value) for t in dead)  # the one retry went to the other upstream
    with pytest.raises(UpstreamUnavailable):
        pool.predict({"data": b"{}"})
    assert pool.up_count() == 0  # both failed twice: marked down
    pool.close()
    with pytest.raises(ValueError, match="no TorchServe upstreams"):
        UpstreamPool("m", [])


def test_revocation_sync_keeps_last_list_when_server_is_unreachable(tmp_path):
    config = GatewayConfig(models=[ModelRoute("m", "id", ["127.0.0.1:1"])], signing_key=tmp_path / "k",
                           license_server=f"127.0.0.1:{free_port()}", revocation_file=tmp_path / "revoked.txt",
                           poll_interval_s=0.5)
    metrics = Metrics()
    sync = RevocationSync(config, metrics)
    sync.revoked = frozenset({"L1"})
    sync.sync_once()
    assert sync.revoked == {"L1"}
    assert metrics.registry.get_sample_value("activeguard_gateway_revocation_sync_errors_total") == 1.0
    sync.stop()


def test_tensor_codec_round_trip_and_validation():
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    assert np.array_equal(from_tensor(to_tensor(x)), x)
    bad = [
        gateway_pb2.Tensor(data=b"\0" * 8, shape=[2], dtype="float64"),
        gateway_pb2.Tensor(data=b"\0" * 7, shape=[2], dtype="float32"),
        gateway_pb2.Tensor(data=b"", shape=[], dtype="float32"),
        gateway_pb2.Tensor(data=b"", shape=[0, 3], dtype="float32"),
        to_tensor(np.array([np.nan], dtype=np.float32)),
    ]
    for tensor in bad:
        with pytest.raises(ValueError):
            from_tensor(tensor)


def test_export_public_key_creates_the_key_once(tmp_path, capsys):
    import json

    from activeguard import licenses
    from activeguard.cli import main

    config = tmp_path / "gateway.json"
    config.write_text(json.dumps({"models": [{"name": "m", "model_id": "x", "upstreams": ["127.0.0.1:1"]}],
                                  "signing_key": str(tmp_path / "gateway.key"), "license_server": "127.0.0.1:2",
                                  "revocation_file": str(tmp_path / "revoked.txt")}))
    pem = tmp_path / "gateway.pub.pem"
    assert main(["gateway", "--config", str(config), "--export-public-key", str(pem)]) == 0
    assert "created" in capsys.readouterr().out
    assert oct((tmp_path / "gateway.key").stat().st_mode & 0o777) == "0o600"
    first = pem.read_bytes()
    assert main(["gateway", "--config", str(config), "--export-public-key", str(pem)]) == 0
    out = capsys.readouterr().out
    assert "loaded" in out and "PRIVATE" not in out and pem.read_bytes() == first  # same key, never overwritten
    signer = licenses.load_signing_key(tmp_path / "gateway.key")
    assert licenses.key_id(licenses.load_public_key(pem)) == licenses.key_id(signer.public_key())
