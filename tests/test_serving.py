"""The ActiveGuard handler inside a real TorchServe, over HTTP (gRPC: test_serving_grpc.py)."""

from __future__ import annotations

import base64
import json
import random
import re
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from activeguard.credentials import sessions
from activeguard.models.architectures import predict
from handlers.packaging import package
from tests.serving_fixtures import header_value, json_body, post

pytestmark = pytest.mark.slow


def url(server, model):
    return f"{server.url}/predictions/{model}"


def metric_counts(server) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    counts = {}
    for line in text.splitlines():
        m = re.match(r"ActiveGuardRequests\{(.*)\} ([0-9.eE+-]+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            counts[(labels["ModelName"], labels["Reason"])] = float(m.group(2))
    return counts


def test_licensed_client_gets_the_real_model(server, deployment, lenet, mnist):
    lic = header_value(deployment.license(0, user="alice"))
    predictions = []
    for chunk in torch.split(mnist.x_test, 250):
        status, body = post(url(server, "guarded"), json_body(chunk), {"X-ActiveGuard-License": lic})
        assert status == 200 and set(body) == {"outputs"}, body
        predictions.append(torch.tensor(body["outputs"]).argmax(1))
    served = float((torch.cat(predictions) == mnist.y_test).float().mean())
    local = float((predict(lenet, mnist.x_test).argmax(1) == mnist.y_test).float().mean())
    assert served == local


def test_unlicensed_client_gets_chance_or_403(server, mnist):
    correct = 0
    for chunk, labels in zip(torch.split(mnist.x_test, 250), torch.split(mnist.y_test, 250)):
        status, body = post(url(server, "guarded"), json_body(chunk))
        assert status == 200 and set(body) == {"outputs"}  # silent: the layout of an admitted answer
        correct += int((torch.tensor(body["outputs"]).argmax(1) == labels).sum())
    assert abs(correct / len(mnist.y_test) - 0.1) <= 0.05
    status, body = post(url(server, "strict"), json_body(mnist.x_test[:2]))
    assert status == 403 and body["reason"] == "no_credentials" and "outputs" not in body


def flip_one_bit(text: str, rng: random.Random) -> str:
    raw = bytearray(text.encode())
    i = rng.randrange(len(raw))
    raw[i] ^= 1 << rng.randrange(7)
    return raw.decode(errors="replace")


def test_bad_licenses_are_refused_each_with_its_reason(server, deployment, mnist, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    d, x = deployment, json_body(mnist.x_test[:3])
    good = d.license(0)
    cases = [
        ("expired", d.license(0, validity=1)),
        ("wrong_model", d.license(0, mid="f" * 64)),
        ("bad_signature", d.license(0, key=Ed25519PrivateKey.generate())),
    ]
    import time

    time.sleep(1.2)
    for reason, lic in cases:
        status, body = post(url(server, "strict"), x, {"X-ActiveGuard-License": header_value(lic)})
        assert (status, body["reason"]) == (403, reason)
    rng = random.Random(0)
    for _ in range(12):  # one bit flipped anywhere in the license file
        status, body = post(url(server, "strict"), x, {"x-activeguard-license": header_value(flip_one_bit(good, rng))})
        assert status == 403 and body["reason"] in ("bad_signature", "malformed_license"), body
    # revocation is read from the file without a restart
    status, body = post(url(server, "strict"), x, {"X-ACTIVEGUARD-LICENSE": header_value(good)})
    assert status == 200 and "outputs" in body
    lic_id = json.loads(base64.b64decode(json.loads(good)["payload"]))["license_id"]
    d.revoke(lic_id)
    try:
        status, body = post(url(server, "strict"), x, {"X-ActiveGuard-License": header_value(good)})
        assert (status, body["reason"]) == (403, "revoked")
    finally:
        d.revoke()


def test_paper_mode(server, deployment, mnist, lenet):
    body = {"inputs": mnist.x_test[:2].tolist(), "fingerprint": deployment.fingerprints[1].tolist()}
    status, out = post(url(server, "paper"), json.dumps(body).encode())
    assert status == 200 and sum(out["outputs"], []) == pytest.approx(
        torch.softmax(predict(lenet, mnist.x_test[:2]), 1).detach().flatten().tolist(), abs=1e-5
    )
    # a fingerprint made for a different model does not pass
    from activeguard.credentials.control import ControlConfig
    from activeguard.credentials.fingerprints import generate_fingerprints
    from activeguard.models.architectures import train_lenet5

    other = train_lenet5(mnist, epochs=2, seed=7)
    foreign = generate_fingerprints(other, ControlConfig(), [17], mnist.x_test[5:6]).inputs
    body["fingerprint"] = foreign[0].tolist()
    status, out = post(url(server, "paper"), json.dumps(body).encode())
    assert (status, out["reason"]) == (403, "fo_mismatch")


def test_sessions_over_http(server, deployment, mnist):
    token, _ = sessions.issue_session(
        deployment.gateway_key,
        user="bob",
        user_index=17,
        license_id="L-bob",
        model_id=deployment.model_id,
        ttl_seconds=60,
    )
    status, body = post(url(server, "strict"), json_body(mnist.x_test[:2]), {"Authorization": f"Bearer {token}"})
    assert status == 200 and body["activeguard"]["user"] == "bob"  # a gateway token: decision explained
    status, body = post(url(server, "strict"), json_body(mnist.x_test[:2]), {"authorization": f"Bearer {token}x"})
    assert status == 403 and body["reason"] == "bad_session"


def test_mixed_batch_each_request_decided_alone(server, deployment, mnist, lenet):
    lic = header_value(deployment.license(0, user="carol"))
    x = mnist.x_test[:4]
    kinds = ["licensed", "none", "malformed", "licensed", "none", "malformed", "licensed", "none"] * 2

    def send(kind):
        if kind == "licensed":
            return kind, post(url(server, "strict"), json_body(x), {"X-ActiveGuard-License": lic})
        if kind == "none":
            return kind, post(url(server, "strict"), json_body(x))
        return kind, post(url(server, "strict"), b'{"inputs": [1, 2')

    with ThreadPoolExecutor(len(kinds)) as pool:
        results = list(pool.map(send, kinds))
    real = predict(lenet, x).argmax(1).tolist()
    for kind, (status, body) in results:
        if kind == "licensed":
            assert status == 200 and torch.tensor(body["outputs"]).argmax(1).tolist() == real
        elif kind == "none":
            assert status == 403 and body["reason"] == "no_credentials"
        else:
            assert status == 400 and body["reason"] == "malformed_input"


def worker_pid(server, model):
    with urllib.request.urlopen(f"{server.management_url}/models/{model}", timeout=5) as resp:
        return json.load(resp)[0]["workers"][0]["pid"]


@pytest.mark.parametrize(
    "raw",
    [b"not json at all", b'{"inputs": [[1.0, 2.0]]}', b'{"inputs": [[[NaN]]]}', b"", b'{"inputs": "x"}'],
    ids=["not-json", "wrong-shape", "nan", "empty", "not-numbers"],
)
def test_malformed_bodies_get_4xx_json_and_the_worker_survives(server, mnist, raw):
    pid = worker_pid(server, "guarded")
    status, body = post(url(server, "guarded"), raw)
    assert 400 <= status < 500 and body.get("reason") == "malformed_input" and body.get("error")
    status, body = post(url(server, "guarded"), json_body(mnist.x_test[:1]))
    assert status == 200
    assert worker_pid(server, "guarded") == pid


def test_oversized_body_is_refused_and_the_worker_survives(server, mnist):
    pid = worker_pid(server, "guarded")
    status, body = post(url(server, "guarded"), b" " * (10 * 1024 * 1024))
    assert status == 400 and body["reason"] == "malformed_input" and "exceeds" in body["error"]
    assert post(url(server, "guarded"), json_body(mnist.x_test[:1]))[0] == 200
    assert worker_pid(server, "guarded") == pid


def test_metrics_count_each_reason(server, deployment, mnist):
    before = metric_counts(server)
    x = json_body(mnist.x_test[:1])
    lic = header_value(deployment.license(1, user="dave"))
    for _ in range(3):
        post(url(server, "strict"), x, {"X-ActiveGuard-License": lic})
    for _ in range(2):
        post(url(server, "strict"), x)
    post(url(server, "strict"), b"{}")
    import time

    time.sleep(1.0)
    after = metric_counts(server)

    def delta(reason):
        return after.get(("strict", reason), 0) - before.get(("strict", reason), 0)

    assert (delta("authorized"), delta("no_credentials"), delta("malformed_input")) == (3, 2, 1)


def test_serve_keeps_torchserve_logs_after_stop(deployment, mnist, tmp_path):
    """`activeguard serve` is stopped with SIGTERM; its logs stay in logs/torchserve/ and it says so."""
    package(deployment.model_path, deployment.profile(policy="reject"), "kept", tmp_path / "store")
    ports = [
        arg
        for flag in ("--http-port", "--grpc-port", "--management-port", "--metrics-port", "--grpc-management-port")
        for arg in (flag, "0")
    ]
    serve = subprocess.Popen(
        [str(Path(sys.executable).with_name("activeguard")), "serve", "kept", "--store", "store", "--json", *ports],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        info = json.loads(serve.stdout.readline() or "{}")
        assert info.get("logs") == str(tmp_path / "logs" / "torchserve"), serve.stderr.read() if not info else info
        status, body = post(f"{info['inference']}/predictions/kept", json_body(mnist.x_test[:1]))
        assert (status, body["reason"]) == (403, "no_credentials")
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=60)
    logs = Path(info["logs"])
    assert serve.returncode == 0 and f"logs are in {logs}" in err
    assert all((logs / name).stat().st_size > 0 for name in ("ts_log.log", "model_log.log", "console.log"))
    assert "kept" in (logs / "ts_log.log").read_text()
    assert not [p.name for p in logs.iterdir() if not p.name.endswith(".log")]  # no pid or temporary files
