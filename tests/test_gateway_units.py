"""Gateway parts that need no server: limits, upstream failover, revocation sync, tensor codec,
payload validation and the decoding of an owner's handler's answers."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activeguard.guard import outcomes as protection
from activeguard_proto.v1 import gateway_pb2
from gateway.errors import HANDLER_REASON_CODES, handler_refusal, upstream_refusal
from gateway.service import GatewayConfig, GatewayService, Limits, Metrics, ModelRoute, Refusal, RevocationSync
from gateway.tensors import MAX_PAYLOAD_BYTES, check_payload, from_tensor, to_tensor
from gateway.upstreams import CallFailed, HttpUpstream, UpstreamError, UpstreamPool, make_upstream
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
    limits.add_session("dave", "s5", time.time() + 60, license_id="L-dave")
    assert limits.active_sessions() == 3
    assert limits.active_sessions(revoked=frozenset({"L-dave"})) == 2  # revoked sessions stop counting


def test_upstream_pool_round_robin_retry_and_mark_down():
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    pool = UpstreamPool("m", dead, deadline_s=2, max_failures=2, down_for_s=60)
    with pytest.raises(UpstreamError) as info:
        pool.predict({"data": b"{}"})
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.tried == dead or info.value.tried == dead[::-1]  # the one retry went to the other upstream
    with pytest.raises(UpstreamError):
        pool.predict({"data": b"{}"})
    assert pool.up_count() == 0  # both failed twice: marked down
    pool.close()
    with pytest.raises(ValueError, match="no TorchServe upstreams"):
        UpstreamPool("m", [])


def test_revocation_sync_keeps_last_list_when_server_is_unreachable(tmp_path):
    config = GatewayConfig(
        models=[ModelRoute("m", "id", ["127.0.0.1:1"])],
        signing_key=tmp_path / "k",
        license_server=f"127.0.0.1:{free_port()}",
        revocation_file=tmp_path / "revoked.txt",
        poll_interval_s=0.5,
    )
    metrics = Metrics()
    sync = RevocationSync(config, metrics)
    sync.revoked = frozenset({"L1"})
    sync.sync_once()
    assert sync.revoked == {"L1"}
    assert metrics.registry.get_sample_value("activeguard_gateway_revocation_sync_errors_total") == 1.0
    sync.stop()


def test_every_handler_reason_has_one_code_and_faults_are_not_rate_limits():
    reasons = set(protection.REFUSED_REASONS)
    assert reasons == set(HANDLER_REASON_CODES)  # the table covers exactly what the guard can answer
    assert HANDLER_REASON_CODES[protection.INTERNAL_ERROR] == grpc.StatusCode.INTERNAL
    assert handler_refusal("something_new").code == grpc.StatusCode.INTERNAL
    for code in grpc.StatusCode:  # TorchServe's own failures never look like the gateway's rate limit
        refusal = upstream_refusal(code, "m")
        assert refusal.code != grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Exception" not in str(refusal) and "org.pytorch" not in str(refusal)
    assert upstream_refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "m").code == grpc.StatusCode.UNAVAILABLE
    assert upstream_refusal(grpc.StatusCode.INTERNAL, "m").code == grpc.StatusCode.UNAVAILABLE


def test_handler_bodies_map_to_codes():
    explained = {protection.EXPLANATION: {"authorized": False, "reason": protection.INTERNAL_ERROR}}
    with pytest.raises(Refusal) as info:
        GatewayService._outcome(explained)
    assert info.value.code == grpc.StatusCode.INTERNAL
    with pytest.raises(Refusal) as info:
        GatewayService._outcome({"outputs": [[0.1] * 10]})  # a silent answer: the handler does not know us
    assert info.value.code == grpc.StatusCode.INTERNAL and "public key" in str(info.value)
    with pytest.raises(Refusal) as info:
        GatewayService._outcome({"error": "x", "reason": protection.MALFORMED_INPUT})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    ok = {"authorized": True, "reason": "authorized", "user": "a", "user_index": 1}
    assert GatewayService._outcome({"outputs": [], protection.EXPLANATION: ok}) == ok


def test_stale_revocation_list_fails_closed_and_is_exported(tmp_path):
    config = GatewayConfig(
        models=[ModelRoute("m", "id", ["127.0.0.1:1"])],
        signing_key=tmp_path / "k",
        license_server=f"127.0.0.1:{free_port()}",
        max_revocation_staleness_s=5,
    )
    metrics = Metrics()
    sync = RevocationSync(config, metrics)
    sync.require_fresh()  # just started: fresh enough
    sync.last_ok -= 6
    with pytest.raises(Refusal) as info:
        sync.require_fresh()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "stale" in str(info.value)
    assert metrics.registry.get_sample_value("activeguard_gateway_revocation_sync_age_seconds") >= 6
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


@pytest.fixture
def service(tmp_path):
    """A gateway service with no server around it (its upstream is never called)."""
    config = GatewayConfig(models=[ModelRoute("m", "id", ["127.0.0.1:1"])], signing_key=tmp_path / "k")
    service = GatewayService(config)
    yield service
    service.close()


def refusal_of(fn) -> Refusal:
    with pytest.raises(Refusal) as info:
        fn()
    return info.value


def test_payloads_are_forwarded_unchanged_and_validated(service):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    for kind in ("image/png", "application/json; charset=utf-8", "application/vnd.example+json"):
        payload = gateway_pb2.Payload(data=png, content_type=kind)
        assert check_payload(payload) == png
        assert service._data(gateway_pb2.PredictRequest(model="m", payload=payload)) == png
    x = np.ones((1, 1, 28, 28), dtype=np.float32)
    npy = service._data(gateway_pb2.PredictRequest(model="m", inputs=to_tensor(x)))
    assert np.array_equal(np.load(io.BytesIO(npy)), x)  # a tensor still travels as .npy
    assert service.config.max_payload_bytes == MAX_PAYLOAD_BYTES  # the largest tensor's bytes by default
    service.config.max_payload_bytes = 1000
    bad = [("empty", b"", "image/png"), ("at most 1000", b"x" * 1001, "image/png")]
    bad += [("not a media type", png, kind) for kind in ("", "png", "a/b/c", "é/x", "a/b;\n", "a/" + "b" * 300)]
    for message, data, kind in bad:
        payload = gateway_pb2.Payload(data=data, content_type=kind)
        refusal = refusal_of(lambda p=payload: service._data(gateway_pb2.PredictRequest(model="m", payload=p)))
        assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT and message in refusal.message, (kind, refusal)
    refusal = refusal_of(lambda: service._data(gateway_pb2.PredictRequest(model="m")))
    assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT and "payload" in refusal.message


def test_oneof_keeps_the_tensor_wire_format():
    """``inputs``/``outputs`` moved into a oneof: a message encoded as before still reads the same."""
    tensor = to_tensor(np.arange(4, dtype=np.float32))
    old = b"\x0a\x01m\x12" + bytes([tensor.ByteSize()]) + tensor.SerializeToString()  # model=1, inputs=2
    request = gateway_pb2.PredictRequest.FromString(old)
    assert request.WhichOneof("body") == "inputs" and request.inputs == tensor
    assert request.SerializeToString() == old
    both = gateway_pb2.PredictRequest(model="m", inputs=tensor)
    both.payload.data = b"x"  # setting one member of the oneof clears the other
    assert both.WhichOneof("body") == "payload" and not both.HasField("inputs")


def attested(**fields) -> dict:
    ok = {"authorized": True, "reason": "authorized", "user": "a", "user_index": 1}
    return {protection.EXPLANATION: ok, **fields}


def test_owner_answers_are_decoded_and_malformed_ones_are_internal():
    answer = json.dumps({"label": "Bag", "confidence": 0.9}, indent=2).encode()
    body = attested(payload_b64=base64.b64encode(answer).decode(), content_type="application/json")
    reply = GatewayService._answer(body, "alice")
    assert reply.WhichOneof("body") == "payload" and reply.user == "alice"
    assert (reply.payload.data, reply.payload.content_type) == (answer, "application/json")
    empty = GatewayService._answer(attested(payload_b64="", content_type="text/plain; charset=utf-8"), "a")
    assert empty.payload.data == b"" and empty.WhichOneof("body") == "payload"  # an empty answer is an answer
    tensor = GatewayService._answer(attested(outputs=[[0.25, 0.75]]), "a")
    assert tensor.WhichOneof("body") == "outputs" and np.allclose(from_tensor(tensor.outputs), [[0.25, 0.75]])
    kind = "application/json"
    malformed = [
        ("is not base64", attested(payload_b64="not base64!", content_type=kind)),
        ("is not base64", attested(payload_b64="QUJD\u00e9", content_type=kind)),  # not even ASCII
        ("is not base64", attested(payload_b64="QUJ", content_type=kind)),  # bad padding
        ("without base64", attested(payload_b64="QUJD")),
        ("without base64", attested(payload_b64="QUJD", content_type="")),
        ("without base64", attested(payload_b64="QUJD", content_type="\ud800/x")),
        ("without base64", attested(payload_b64=None, content_type=kind)),
        ("without base64", attested(payload_b64=["QUJD"], content_type=kind)),
        ("without outputs", attested()),
    ]
    for message, body in malformed:
        refusal = refusal_of(lambda b=body: GatewayService._answer(b, "a"))
        assert refusal.code == grpc.StatusCode.INTERNAL and message in refusal.message, (body, refusal)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    encoded=json_values | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    kind=json_values | st.sampled_from(["application/json", "image/png", "text/plain; charset=utf-8"]),
    outputs=st.none() | json_values,
)
def test_any_handler_answer_is_a_reply_or_an_internal_refusal(encoded, kind, outputs):
    body = attested(payload_b64=encoded, content_type=kind, outputs=outputs)
    try:
        reply = GatewayService._answer(json.loads(json.dumps(body)), "a")
    except Refusal as refusal:
        assert refusal.code == grpc.StatusCode.INTERNAL and refusal.message
    else:
        assert reply.payload.data == base64.b64decode(encoded) and reply.payload.content_type == kind


@settings(max_examples=300, derandomize=True, deadline=None)
@given(data=st.binary(max_size=80), kind=st.text(max_size=80) | st.sampled_from(["image/png", "a/b; q=1"]))
def test_any_payload_is_forwarded_as_is_or_refused_as_invalid(data, kind):
    try:
        forwarded = check_payload(gateway_pb2.Payload(data=data, content_type=kind), max_bytes=64)
    except ValueError as exc:
        assert str(exc)
    else:
        assert forwarded == data and 0 < len(data) <= 64 and "/" in kind and kind.isascii()


def test_export_public_key_creates_the_key_once(tmp_path, capsys):
    import json

    from activeguard.cli.app import main
    from activeguard.credentials import licenses

    config = tmp_path / "gateway.json"
    config.write_text(
        json.dumps(
            {
                "models": [{"name": "m", "model_id": "x", "upstreams": ["127.0.0.1:1"]}],
                "signing_key": str(tmp_path / "gateway.key"),
                "license_server": "127.0.0.1:2",
                "revocation_file": str(tmp_path / "revoked.txt"),
            }
        )
    )
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


class _Handler(http.server.BaseHTTPRequestHandler):
    """TorchServe's HTTP API as the gateway sees it: the path picks the answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe
    seen: list[tuple[str, str, str, bytes]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, self.headers["Content-Type"], self.headers.get("Authorization", ""), body))
        status, answer = {
            "/predictions/ok": (200, b'{"outputs": [[1.0]]}'),
            "/predictions/refused": (403, b'{"error": "unauthorized", "reason": "bad_session"}'),
            "/predictions/missing": (404, b'{"code": 404, "type": "ModelNotFoundException"}'),
            "/predictions/busy": (503, b'{"code": 503, "type": "ServiceUnavailableException"}'),
        }[self.path]
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_http_upstream_passes_handler_answers_and_maps_torchserve_errors():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    upstream = make_upstream(f"http://127.0.0.1:{server.server_port}")
    try:
        assert isinstance(upstream, HttpUpstream)
        body = upstream.call("ok", {"data": b"\x89PNG", "session": b"tok"}, "image/png", 5)
        assert body == b'{"outputs": [[1.0]]}'
        assert _Handler.seen[-1] == ("/predictions/ok", "image/png", "Bearer tok", b"\x89PNG")
        assert b"bad_session" in upstream.call("refused", {"data": b"x"}, None, 5)  # the handler's refusal
        assert _Handler.seen[-1][1] == "application/octet-stream"
        for model, code in (("missing", grpc.StatusCode.NOT_FOUND), ("busy", grpc.StatusCode.UNAVAILABLE)):
            with pytest.raises(CallFailed) as failed:
                upstream.call(model, {"data": b"x"}, None, 5)
            assert failed.value.code == code
    finally:
        server.shutdown()
        server.server_close()
    upstream.close()
    with pytest.raises(CallFailed) as failed:  # nothing listens there: refused twice, then UNAVAILABLE
        make_upstream(f"http://127.0.0.1:{free_port()}").call("ok", {"data": b"x"}, None, 2)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="http://"):
        make_upstream("http://no-port")
