"""Black-box suspects: a real TorchServe serving a plain LeNet-5, and a stub HTTP server misbehaving."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from activeguard.audit import ipguard
from activeguard.audit.remote import SuspectError, open_suspect, probabilities
from activeguard.guard.profile import Profile
from activeguard.models.architectures import MLPClassifier, save_model


@pytest.fixture(scope="module")
def owner_file(lenet, tmp_path_factory):
    path = tmp_path_factory.mktemp("remote") / "model.pt"
    return path, save_model(lenet, path)


@pytest.fixture(scope="module")
def served(owner_file):
    """The owner's LeNet-5 behind TorchServe with the plain (unprotected) benchmark handler."""
    from benchmarks.bench_serving import PLAIN_HANDLER
    from handlers.packaging import package
    from handlers.server import ManagedTorchServe

    path, mid = owner_file
    store = path.parent / "store"
    package(path, Profile(model_id=mid, input_shape=(1, 28, 28)), "plain", store, handler=PLAIN_HANDLER)
    with ManagedTorchServe(store, {"plain": "plain.mar"}) as ts:  # stops TorchServe even if a test fails
        yield ts


@pytest.fixture(scope="module")
def fingerprint(lenet, mnist):
    return ipguard.generate(lenet, 20, k=3.0, method="TL", x_train=mnist.x_train, seed=0)


def test_remote_matching_rate_equals_local(served, owner_file, fingerprint, lenet):
    local = open_suspect(owner_file[0])
    with open_suspect(f"{served.url}/predictions/plain", batch_size=8) as remote:  # 3 requests, one connection
        scores = remote(fingerprint.points)
        remote_rate = ipguard.verify(fingerprint, remote, num_classes=10)
    assert scores.shape == (20, 10)
    assert torch.allclose(scores, torch.softmax(lenet(fingerprint.points), 1).detach(), atol=1e-5)
    assert remote_rate == ipguard.verify(fingerprint, local, num_classes=10) == 1.0
    torch.manual_seed(0)
    assert ipguard.verify(fingerprint, MLPClassifier()) < 1.0  # the rate is not 1.0 for just anything


def test_tafa_against_a_url_suspect(served, owner_file, lenet):
    """TAFA's kink statistic through TorchServe: the served owner is a sure copy with every point matched
    (the probabilities a URL answers are turned back into centred logits), an untrained MLP is not."""
    from activeguard.audit import tafa
    from activeguard.audit.base import Owner

    fp = tafa.METHOD.generate(Owner(lenet, (1, 28, 28), 10, "classification"), tafa.TafaParams(points=20), seed=0)
    with open_suspect(f"{served.url}/predictions/plain", batch_size=64) as remote:
        served_score = tafa.METHOD.score(fp, remote)
    assert served_score.value == pytest.approx(1.0)
    assert served_score.evidence["matched_points"] == len(fp.points) == len(served_score.evidence["per_point"])
    torch.manual_seed(0)
    stranger = MLPClassifier().eval()
    verdict = tafa.METHOD.score(fp, lambda x: stranger(x).detach())
    assert verdict.value < tafa.DECISION_THRESHOLD and verdict.evidence["matched_points"] < len(fp.points)


def test_served_errors_are_named(served, fingerprint):
    with pytest.raises(SuspectError, match=r"HTTP 404: .*nosuch"):
        open_suspect(f"{served.url}/predictions/nosuch")(fingerprint.points[:2])
    with pytest.raises(SuspectError, match=r"HTTP 5\d\d"):  # the served LeNet-5 cannot take 32x32 inputs
        open_suspect(f"{served.url}/predictions/plain")(torch.rand(2, 1, 32, 32))


class _Stub(BaseHTTPRequestHandler):
    """Answers by path: what a broken or hostile endpoint might send back."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        rows = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["inputs"])
        path = self.path.rsplit("/", 1)[-1]
        status, body = 200, None
        if path == "slow":
            time.sleep(1.5)
            body = {"outputs": [[1.0, 0.0]] * rows}
        elif path == "garbage":
            body = b"<html>502 Bad Gateway</html>"
        elif path == "rows":
            body = {"outputs": [[0.5, 0.5]] * (rows - 1)}
        elif path == "nan":
            body = b'{"outputs": [[NaN, 1.0]' + b", [0.5, 0.5]" * (rows - 1) + b"]}"
        elif path == "ragged":
            body = [[0.5, 0.5]] * (rows - 1) + [[1.0]]
        elif path == "error":
            status, body = 507, {"code": 507, "type": "InternalServerException", "message": "worker died"}
        elif path == "labels":
            body = list(range(rows))
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
            pass


@pytest.fixture(scope="module")
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/predictions"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "path, message",
    [
        ("garbage", r"did not answer JSON \(HTTP 200\): '<html>502"),
        ("rows", "answered 2 rows for 3 queries"),
        ("nan", "NaN or infinite scores in 1 of 3 rows"),
        ("ragged", r"ragged rows: row lengths \[1, 2\]"),
        ("error", "answered HTTP 507: worker died"),
    ],
)
def test_bad_answers_raise_suspect_error(stub, path, message):
    with pytest.raises(SuspectError, match=message):
        open_suspect(f"{stub}/{path}")(torch.zeros(3, 2))


def test_timeout_is_reported(stub):
    start = time.perf_counter()
    with pytest.raises(SuspectError, match=r"did not answer within the 0.3 s timeout"):
        open_suspect(f"{stub}/slow", timeout_s=0.3)(torch.zeros(2, 2))
    assert time.perf_counter() - start < 1.4  # gave up at the timeout, no silent retry


def test_connection_refused_is_reported():
    from handlers.server import free_port

    with pytest.raises(SuspectError, match="connection refused"):
        open_suspect(f"http://127.0.0.1:{free_port()}/predictions/mnist")(torch.zeros(1, 2))


def test_labels_and_batching(stub):
    suspect = open_suspect(f"{stub}/labels", batch_size=2)
    assert suspect(torch.zeros(5, 2)).tolist() == [0, 1, 0, 1, 0]  # three requests of 2, 2 and 1 rows
    with pytest.raises(SuspectError, match="labels only"):
        probabilities(suspect(torch.zeros(2, 2)))


def test_local_suspect_errors(tmp_path, fingerprint):
    with pytest.raises(SuspectError, match="does not exist"):
        open_suspect(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SuspectError, match="not a loadable"):
        open_suspect(tmp_path / "junk.pt")
    save_model(MLPClassifier(in_features=100), tmp_path / "mlp.pt")
    with pytest.raises(SuspectError, match=r"takes inputs of shape \(100,\).*\(1, 28, 28\)"):
        open_suspect(tmp_path / "mlp.pt")(fingerprint.points)
    with pytest.raises(SuspectError, match="only http"):
        open_suspect("ftp://example.org/model")
