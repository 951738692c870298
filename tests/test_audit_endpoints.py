"""Request templates, response paths and headers of URL suspects (activeguard/audit/endpoints.py), and the
transports that use them against in-process stubs: an HTTP API with an API key and a TorchServe-like gRPC
servicer. The parsers take any text: they either parse or raise EndpointError, never anything else."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from activeguard.audit.endpoints import (
    EACH,
    EndpointApi,
    EndpointError,
    RequestTemplate,
    ResponsePath,
    parse_header,
    parse_response_path,
    read_template,
)
from activeguard.audit.remote import SuspectError, open_suspect
from activeguard_proto.torchserve import inference_pb2, inference_pb2_grpc

FUZZ = settings(max_examples=300, derandomize=True, deadline=None)
JSONISH = st.text(alphabet='{}[]":, 0123456789.-*abrowsNI\\\n', max_size=40)
PATHISH = st.text(alphabet='ab_.[]*"0123456789- \\', max_size=30)
MARKS = {'"\u2603rows"': "{{rows}}", '"\u2603row"': "{{ row }}"}  # JSON strings that become placeholders


def _template_text(value, edit: tuple[int, str]) -> str:
    """A JSON value with placeholders where its marks were, then one character inserted (or none)."""
    text = json.dumps(value, ensure_ascii=False)
    for mark, placeholder in MARKS.items():
        text = text.replace(mark, placeholder)
    at, char = edit
    return text if not char else text[: at % (len(text) + 1)] + char + text[at % (len(text) + 1) :]


_VALUES = st.recursive(
    st.none() | st.integers(-9, 9) | st.text("ab", max_size=2) | st.sampled_from(["\u2603rows", "\u2603row"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("ab", max_size=2), inner, max_size=3),
    max_leaves=6,
)
_SHAPES = [lambda a, m, b: [a, m, b], lambda a, m, b: {"a": a, "in": m}, lambda a, m, b: {"x": [{"p": m}], "b": b}]
TEMPLATES = st.builds(  # mostly one placeholder in valid JSON (more where the values hold marks), then an edit
    _template_text,
    st.builds(
        lambda shape, a, mark, b: shape(a, mark, b),
        st.sampled_from(_SHAPES),
        _VALUES,
        st.sampled_from(["\u2603rows", "\u2603row"]),
        _VALUES,
    ),
    st.tuples(st.integers(0, 99), st.sampled_from(["", "", "", '"', ",", "[", "}", " ", "{{row}}", "NaN"])),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from("ab"), inner, max_size=2),
    max_leaves=12,
)


# --- request templates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, per_row, body",
    [
        ('{"inputs": {{rows}}}', False, {"inputs": [[1.0], [2.0]]}),
        ('{"instances": [{"pixels": {{ rows }}}]}', False, {"instances": [{"pixels": [[1.0], [2.0]]}]}),
        ("{{rows}}", False, [[1.0], [2.0]]),
        ('{"image": {{row}}, "top_k": 3}', True, {"image": [[1.0], [2.0]], "top_k": 3}),
    ],
)
def test_templates_put_the_inputs_where_the_placeholder_stands(text, per_row, body):
    template = RequestTemplate.parse(text)
    assert template.per_row is per_row
    assert json.loads(template.render([[1.0], [2.0]])) == body


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"instances": []}', "has no placeholder"),
        ("[{{rows}}, {{row}}]", "has 2 placeholders"),
        ('{"x": {{inputs}}}', r"unknown placeholder \{\{inputs\}\}"),
        ('{"x": "{{rows}}"}', "stands inside a string"),
        ('{"x": {{rows}}', r"not valid JSON .*line 1, column 15"),
        ('{"x": {{rows}}1}', "not valid JSON"),
        ("{{{rows}}: 1}", "not valid JSON"),
        ('[NaN, "{{rows}}"]', "holds NaN, which is not JSON"),
    ],
)
def test_bad_templates_say_why(text, message):
    with pytest.raises(EndpointError, match=message):
        RequestTemplate.parse(text)


def test_template_from_a_file(tmp_path):
    (tmp_path / "t.json").write_text('{\n  "instances": {{rows}}\n}\n')
    assert json.loads(read_template(f"@{tmp_path / 't.json'}").render([[0.5]])) == {"instances": [[0.5]]}
    with pytest.raises(EndpointError, match="cannot read the request template .*missing.json"):
        read_template(f"@{tmp_path / 'missing.json'}")


@FUZZ
@given(st.one_of(st.text(max_size=40), JSONISH, TEMPLATES))
def test_any_text_parses_as_a_template_or_says_why(text):
    try:
        template = RequestTemplate.parse(text)
    except EndpointError:
        return
    rows = [[0.25, 1.0], [0.5, 0.0]]
    body = json.loads(template.render(rows[0] if template.per_row else rows))  # valid JSON, the inputs in it
    assert json.dumps(rows[0] if template.per_row else rows) in json.dumps(body)


# --- response paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, steps",
    [
        ("outputs", ("outputs",)),
        ("predictions[*].probs", ("predictions", EACH, "probs")),
        (".data.scores", ("data", "scores")),
        ("[*].label", (EACH, "label")),
        ('results[0]["top.k"][-1]', ("results", 0, "top.k", -1)),
        (".", ()),
    ],
)
def test_path_syntax(text, steps):
    assert ResponsePath.parse(text).steps == steps


def test_auto_is_the_default():
    assert parse_response_path(None) is None and parse_response_path(" auto ") is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("a..b", "character 3: empty key"),
        ("a[x]", r"inside \[ \] put \*"),
        ("a[0", r"'\[' without '\]'"),
        ("a]b", "expected '.' or '\\['"),
        ('a["b"', "expected '\\]' after the quoted key"),
    ],
)
def test_bad_paths_say_where(text, message):
    with pytest.raises(EndpointError, match=message):
        ResponsePath.parse(text)


def test_extraction_names_the_path_and_what_it_found():
    answer = {"predictions": [{"label": 3, "probs": [0.1, 0.9]}, {"label": 1}]}
    assert ResponsePath.parse("predictions[*].label").extract(answer) == [3, 1]
    assert ResponsePath.parse("predictions[0].probs").extract(answer) == [0.1, 0.9]
    cases = {
        "predictions[*].probs": 'predictions[1] has no key "probs": it is an object with keys label',
        "predictions.probs": 'predictions is a list of 2, not an object with key "probs"',
        "predictions[5]": "predictions is a list of 2: no index 5",
        "data[*]": 'the answer has no key "data": it is an object with keys predictions',
        "predictions[0].label[*]": "predictions[0].label is the number 3, not a list to map [*] over",
    }
    for path, message in cases.items():
        with pytest.raises(EndpointError) as caught:
            ResponsePath.parse(path).extract(answer)
        assert str(caught.value) == f"response path {path}: {message}"


@FUZZ
@given(st.one_of(st.text(max_size=30), PATHISH), JSON_VALUES)
def test_any_text_parses_as_a_path_or_says_why(text, answer):
    try:
        path = ResponsePath.parse(text)
    except EndpointError:
        return
    assert ResponsePath.parse(str(path)).steps == path.steps  # its canonical text means the same path
    try:
        path.extract(answer)
    except EndpointError as exc:
        assert str(exc).startswith(f"response path {path.text}: ")


# --- headers -------------------------------------------------------------------------------------


def test_headers():
    assert parse_header("X-Api-Key:  s3cret ") == ("X-Api-Key", "s3cret")
    assert parse_header("Authorization: Bearer a:b") == ("Authorization", "Bearer a:b")


@FUZZ
@given(st.text(max_size=30), st.text(alphabet="XYZ#0123456789", min_size=6, max_size=20))
def test_a_bad_header_never_shows_its_value(name, secret):
    for text in (f"{name}:{secret}", secret):
        try:
            parse_header(text, 2)
        except EndpointError as exc:
            assert secret not in str(exc)


# --- an HTTP API of its own, with an API key -----------------------------------------------------


class _Api(BaseHTTPRequestHandler):
    """``{"image": row}`` in, ``{"result": {"scores": [...]}}`` out, only with the right X-Api-Key."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("X-Api-Key") != "s3cret":
            status, answer = 401, {"error": "missing or wrong API key"}
        else:
            total = sum(torch.tensor(body["image"]).flatten().tolist())
            status, answer = 200, {"result": {"scores": [total, 1.0 - total]}}
        raw = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture(scope="module")
def api_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/score"
    finally:
        server.shutdown()
        server.server_close()


def test_one_request_per_row_with_an_api_key(api_url):
    api = EndpointApi(
        RequestTemplate.parse('{"image": {{row}}}'), ResponsePath.parse("result.scores"), (("X-Api-Key", "s3cret"),)
    )
    x = torch.tensor([[0.25, 0.25], [0.0, 0.5], [0.0, 0.0]])
    with open_suspect(api_url, api=api, batch_size=2) as suspect:
        assert suspect(x).tolist() == [[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]]
    wrong = EndpointApi(api.template, api.response, (("X-Api-Key", "guess-0000"),))
    with pytest.raises(SuspectError, match="answered HTTP 401: missing or wrong API key") as caught:
        open_suspect(api_url, api=wrong)(x)
    assert "guess-0000" not in str(caught.value)
    lost = EndpointApi(api.template, ResponsePath.parse("result.probs"), api.headers)
    with pytest.raises(SuspectError, match=r'response path result.probs: result has no key "probs"'):
        open_suspect(api_url, api=lost)(x)


# --- TorchServe's gRPC API, stubbed ---------------------------------------------------------------


class _Inference(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """Answers as TorchServe's gRPC API would: ``slow`` sleeps, other names are unknown; ``echo`` answers
    the sum of the row, and the call's metadata, as JSON."""

    def Predictions(self, request, context):
        if request.model_name == "slow":
            time.sleep(1.0)
        if request.model_name not in ("echo", "slow"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"Model not found: {request.model_name}\nat somewhere")
        row = json.loads(request.input["pixels"])
        answer = {"outputs": [[sum(row), 1.0 - sum(row)]], "metadata": dict(context.invocation_metadata())}
        return inference_pb2.PredictionResponse(prediction=json.dumps(answer).encode())


@pytest.fixture(scope="module")
def grpc_target():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(_Inference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_grpc_rows_input_key_and_metadata(grpc_target):
    api = EndpointApi(headers=(("X-Api-Key", "s3cret"),), grpc_input_key="pixels")
    with open_suspect(f"grpc://{grpc_target}/echo", api=api) as suspect:  # default: the row's JSON, one call each
        assert suspect(torch.tensor([[0.25, 0.5], [0.0, 0.0]])).tolist() == [[0.75, 0.25], [0.0, 1.0]]
    meta = EndpointApi(RequestTemplate.parse("{{row}}"), ResponsePath.parse("metadata"), api.headers, "pixels")
    with pytest.raises(SuspectError, match=r"metadata\) gave an object with keys .*x-api-key.*, expected one score"):
        open_suspect(f"grpc://{grpc_target}/echo", api=meta)(torch.zeros(1, 2))  # the header came as metadata


def test_grpc_failures_are_one_line(grpc_target):
    from handlers.server import free_port

    x = torch.zeros(1, 2)
    api = EndpointApi(grpc_input_key="pixels")
    with pytest.raises(SuspectError, match=r"has no model 'nosuch' \(NOT_FOUND: Model not found: nosuch\)$"):
        open_suspect(f"grpc://{grpc_target}/nosuch", api=api)(x)
    with pytest.raises(SuspectError, match=r"did not answer within the 0.2 s timeout$"):
        open_suspect(f"grpc://{grpc_target}/slow", api=api, timeout_s=0.2)(x)
    with pytest.raises(SuspectError, match=r"cannot reach grpc://127.0.0.1:\d+/m: UNAVAILABLE") as caught:
        open_suspect(f"grpc://127.0.0.1:{free_port()}/m", timeout_s=5)(x)
    assert "\n" not in str(caught.value)
    for url in ("grpc://127.0.0.1:7070", "grpc://127.0.0.1:7070/a/b/c"):
        with pytest.raises(SuspectError, match="give the model"):
            open_suspect(url)


# --- the command line checks the flags before anything runs --------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--suspect", "owner.pt", "--response-path", "label"], "apply to endpoints, and no --suspect is a URL"),
        (["--suspect", "http://h:1/p", "--header", "s3cret-token"], "--header number 1 has no ':'"),
        (["--suspect", "http://h:1/p", "--request-template", "@missing.json"], "cannot read the request template"),
        (["--suspect", "grpc://h:1/p", "--response-path", "a["], "'\\[' without '\\]'"),
    ],
)
def test_cli_refuses_bad_endpoint_flags_at_start(flags, message, capsys, tmp_path):
    from tests.test_cli import run_cli

    code, out, err = run_cli(["audit", "ipguard", "--fingerprint", str(tmp_path / "none.ipguard"), *flags], capsys)
    assert code == 2 and not out and err.count("\n") == 1 and "s3cret" not in err
    assert re.search(message, err), err
