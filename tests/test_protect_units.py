"""`activeguard protect` without a server: what the protected archive holds, what is refused, and the
composed handler (ActiveGuard around the owner's handler) driven through TorchServe's MockContext."""

from __future__ import annotations

import base64
import json
import sys
import zipfile

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from activeguard.cli.app import main
from activeguard.credentials import licenses, sessions
from activeguard.credentials.fo_space import FO
from activeguard.guard.outcomes import EXPLANATION
from activeguard.guard.profile import PROFILE_FILE, Profile
from handlers.activeguard_handler import ActiveGuardHandler
from handlers.archives import MANIFEST, MarArchive
from handlers.server import MANAGED_KEYS, merge_config, read_config
from tests.protect_fixtures import OWNER_FILES, archive, png, write_labels
from tests.serving_fixtures import BatchContext

SPEC_FLAGS = ["--input-shape", "1,28,28"]


@pytest.fixture(scope="module")
def owner_mar(tmp_path_factory):
    """A tiny untrained network as plain TorchScript, with the owner's PNG handler and label names."""
    root = tmp_path_factory.mktemp("owner")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    scripted = root / "tiny.pt"
    torch.jit.save(torch.jit.script(net), str(scripted))
    labels = write_labels(root / "index_to_name.json")
    mar = archive(root / "plain", "tiny", scripted, str(OWNER_FILES / "fashion_handler.py"), [labels])
    return {"root": root, "mar": mar, "net": net}


@pytest.fixture(scope="module")
def protected(owner_mar, tmp_path_factory):
    root = tmp_path_factory.mktemp("protected")
    gateway = Ed25519PrivateKey.generate()
    (root / "gateway.pub.pem").write_bytes(licenses.public_key_pem(gateway.public_key()))
    store = root / "store"
    args = ["protect", str(owner_mar["mar"]), "--out-dir", str(store), "--gateway-key", str(root / "gateway.pub.pem")]
    assert main([*args, *SPEC_FLAGS]) == 0
    return {"mar": store / "tiny.mar", "gateway": gateway}


def test_the_protected_archive_keeps_everything_the_owner_put_in_it(owner_mar, protected):
    before, after = MarArchive.read(owner_mar["mar"]), MarArchive.read(protected["mar"])
    for name, data in before.entries.items():
        assert after.entries[name] == data  # model, the owner's handler, extra files: byte for byte
    assert set(after.entries) - set(before.entries) == {"activeguard_handler.py", PROFILE_FILE}
    assert after.handler == "activeguard_handler.py"
    kept = {k: v for k, v in before.model.items() if k != "handler"}
    assert {k: after.model[k] for k in kept} == kept and after.manifest["runtime"] == before.manifest["runtime"]
    profile = Profile.from_json(after.entries[PROFILE_FILE].decode())
    assert profile.owner_handler == before.handler == "fashion_handler.py" and profile.source == "torchscript"


def test_protect_refuses_what_it_cannot_compose(owner_mar, protected, tmp_path, capsys):
    out = ["--out-dir", str(tmp_path / "store"), *SPEC_FLAGS]
    assert main(["protect", str(protected["mar"]), *out]) == 2  # protecting twice
    assert "already protected" in capsys.readouterr().err
    entry = MarArchive.read(owner_mar["mar"])
    function_entry = type(entry)(
        dict(entry.manifest, model=dict(entry.model, handler="fashion_handler.py:handle")), entry.entries
    )
    function_entry.write(tmp_path / "fn.mar")
    assert main(["protect", str(tmp_path / "fn.mar"), *out]) == 2
    assert "function entry point" in capsys.readouterr().err
    (tmp_path / "junk.mar").write_bytes(b"not a zip")
    assert main(["protect", str(tmp_path / "junk.mar"), *out]) == 2
    assert "not a TorchServe archive" in capsys.readouterr().err
    assert main(["protect", str(owner_mar["mar"]), "--out-dir", str(tmp_path / "s2")]) == 2  # no input shape
    assert "--input-shape" in capsys.readouterr().err
    with zipfile.ZipFile(tmp_path / "evil.mar", "w") as zf:
        zf.writestr(MANIFEST, json.dumps({"model": {"handler": "h.py"}}))
        zf.writestr("../escape.py", "")
    assert main(["protect", str(tmp_path / "evil.mar"), *out]) == 2
    assert "unsafe path" in capsys.readouterr().err


def test_the_owners_config_properties_is_kept_except_the_managed_keys(tmp_path):
    path = tmp_path / "config.properties"
    path.write_text("# comment\nservice_envelope=json\njob_queue_size: 50\ninference_address=http://0.0.0.0:80\n\n")
    owner = read_config(path)
    assert owner == {"service_envelope": "json", "job_queue_size": "50", "inference_address": "http://0.0.0.0:80"}
    merged = merge_config(owner, {"inference_address": "http://127.0.0.1:1", "model_store": "/s"})
    assert merged == {
        "inference_address": "http://127.0.0.1:1",
        "model_store": "/s",
        "service_envelope": "json",
        "job_queue_size": "50",
    }
    assert "inference_address" in MANAGED_KEYS
    path.write_text("no separator here\n")
    with pytest.raises(ValueError, match="expected key=value"):
        read_config(path)


@pytest.fixture(scope="module")
def handler(protected, tmp_path_factory):
    """The composed handler as a TorchServe worker runs it: the archive unpacked, its folder on sys.path."""
    model_dir = tmp_path_factory.mktemp("model_dir")
    with zipfile.ZipFile(protected["mar"]) as zf:
        zf.extractall(model_dir)
    sys.path.insert(0, str(model_dir))
    try:
        context = BatchContext(model_dir)
        context.manifest = json.loads((model_dir / MANIFEST).read_text())
        h = ActiveGuardHandler()
        h.initialize(context)
        yield h, model_dir
    finally:
        sys.path.remove(str(model_dir))


def _run(h, model_dir, rows, headers=None):
    context = BatchContext(model_dir, headers)
    return h.handle(rows, context), context.statuses


def test_unlicensed_png_gets_an_answer_of_the_owners_form_and_garbage_gets_a_400(handler):
    h, model_dir = handler
    image = torch.rand(1, 28, 28)
    answers, statuses = _run(h, model_dir, [{"body": png(image)}, {"body": b"garbage"}, {"data": png(image)}])
    assert set(answers[0]) == {"label", "confidence"} and set(answers[2]) == {"label", "confidence"}
    assert statuses[1][0] == 400 and json.loads(answers[1])["reason"] == "malformed_input"
    assert 0 not in statuses and 2 not in statuses


def test_a_gateway_session_gets_the_owners_answer_beside_the_decision(handler, protected, owner_mar):
    h, model_dir = handler
    token, _ = sessions.issue_session(
        protected["gateway"],
        user="alice",
        user_index=3,
        license_id="lic-1",
        model_id=h.guard.profile.model_id,
        ttl_seconds=60,
    )
    image = torch.rand(1, 28, 28)
    answers, statuses = _run(h, model_dir, [{"data": png(image), "session": token.encode()}])
    body = json.loads(answers[0])
    assert statuses == {} and body[EXPLANATION] == {
        "authorized": True,
        "reason": "session_authorized",
        "user": "alice",
        "user_index": 3,
    }
    owner_answer = h.owner.postprocess(owner_mar["net"](h.owner.preprocess([{"data": png(image)}])))[0]
    assert json.loads(base64.b64decode(body["payload_b64"])) == owner_answer
    assert body["content_type"] == "application/json"


row_values = st.one_of(
    st.none(), st.binary(max_size=64), st.text(max_size=32), st.integers(), st.lists(st.integers(), max_size=4)
)
rows = st.one_of(
    st.dictionaries(st.sampled_from(["body", "data", "license", "session", "explain", "x"]), row_values, max_size=5),
    row_values,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(rows, min_size=1, max_size=6))
def test_no_row_a_client_can_send_crashes_the_composed_handler(handler, batch):
    h, model_dir = handler
    answers, statuses = _run(h, model_dir, batch)
    assert len(answers) == len(batch)
    for i, answer in enumerate(answers):
        status = statuses.get(i, (200, ""))[0]
        assert status in (200, 400, 403), (batch[i], answer)
        if status != 200:
            assert json.loads(answer)["reason"]


def test_license_header_prints_the_compact_form_a_curl_client_sends(tmp_path, capsys):
    from activeguard.credentials.header import decode_license_header

    key = Ed25519PrivateKey.generate()
    payload = licenses.make_payload(
        model_id="0" * 64,
        user="alice",
        user_index=0,
        fo=FO(0, 0.2),
        epsilon=0.01,
        fingerprint=torch.rand(1, 1, 28, 28),
        key=key,
        validity_seconds=60,
    )
    signed = licenses.sign_license(payload, key)
    path = licenses.write_license(signed, tmp_path / "alice.aglicense")
    assert main(["license", "header", str(path)]) == 0
    header = capsys.readouterr().out.strip()
    assert len(header) < 8192 and decode_license_header(header) == signed.to_text()
