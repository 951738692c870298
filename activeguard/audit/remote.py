"""Suspects for the black-box audits: a local model file or a model behind a TorchServe-style endpoint.

:func:`open_suspect` turns either into one callable ``x (n, *shape) -> outputs`` that the audit
methods (``ipguard.verify``, ``conferrable.caeacc``, ``tafa.verify``) accept:

* a path: any model source :func:`activeguard.models.sources.load` reads (ActiveGuard checkpoint,
  TorchScript, exported program, state dict with ``model_file``/``model_class``; no arbitrary
  unpickling), queried as a client queries it: its own input spec where the file carries one,
  else the owner's (recorded in the fingerprint file). Outputs are logits for classifiers;
* an ``http://`` or ``https://`` URL, e.g. ``http://host:8080/predictions/mnist``: every batch of
  at most ``batch_size`` rows is sent as ``POST {"inputs": [...]}`` (the body our handlers and the
  plain TorchServe handler accept) on one kept-alive connection; the answer is
  ``{"outputs": [[...], ...]}``, or a bare list of score vectors, or a bare list of labels;
* a ``grpc://host:port/<model>[/<version>]`` URL (port 7070 when left out): TorchServe's gRPC
  inference API, ``InferenceAPIsService/Predictions``, one call per row by default with the row's
  JSON in the ``input`` map under ``data``; the answer's ``prediction`` bytes are read as JSON.

Any other JSON API is spoken through an :class:`activeguard.audit.endpoints.EndpointApi`: a request
template (``{"instances": {{rows}}}``, or ``{{row}}`` for one request per row), a response path
(``predictions[*].probs``), headers (API keys) and, for gRPC, the input map's key.

Nothing is retried: the first failure raises :class:`SuspectError` (a ``ValueError``, so the CLI
reports it as an input error, exit 2) saying what went wrong - connection refused, timeout, an
HTTP error status or gRPC code (with the server's reason), an answer that is not JSON or that the
response path does not fit, the wrong number of rows, NaN or infinite values, ragged rows, or a
local model that cannot take the fingerprint's input shape.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from activeguard.audit.base import MODEL_ERRORS, as_probabilities, error_reason
from activeguard.audit.endpoints import DEFAULT_TEMPLATE, ROW_TEMPLATE, EndpointApi, EndpointError, RequestTemplate
from activeguard.models import inputs, sources

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_BATCH_SIZE = 64  # 64 MNIST rows are ~1 MB of JSON, far below TorchServe's 6.5 MB default request limit
DEFAULT_GRPC_PORT = 7070  # TorchServe's gRPC inference port
SCHEMES = ("http", "https", "grpc")


class SuspectError(ValueError):
    """A suspect could not be queried or answered something unusable; the message says which and why."""


class Suspect:
    """Callable suspect: ``suspect(x)`` returns a float tensor (n, m) of scores or an int64 tensor (n,) of labels."""

    #: one input row's shape when known (local checkpoints), else None
    input_shape: tuple[int, ...] | None = None

    def __init__(self, name: str, batch_size: int):
        if batch_size < 1:
            raise SuspectError(f"batch size must be at least 1, got {batch_size}")
        self.name = name
        self.batch_size = batch_size

    def _accepts(self, row_shape: tuple[int, ...]) -> bool:
        """Same shape, or a flat-input model (an MLP flattens its input) with as many values per row."""
        if row_shape == self.input_shape:
            return True
        return len(self.input_shape) == 1 and math.prod(row_shape) == self.input_shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        if self.input_shape is not None and not self._accepts(tuple(x.shape[1:])):
            raise SuspectError(
                f"suspect {self.name} takes inputs of shape {self.input_shape}, "
                f"but the queries have shape {tuple(x.shape[1:])}"
            )
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            x = x.reshape(len(x), *self.input_shape)  # a flat-input model takes the same values flattened
        parts = [self._query(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        if not parts:
            raise SuspectError("no queries to send: the fingerprint holds no points")
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise SuspectError(f"suspect {self.name} answered batches with different row shapes: {sorted(shapes)}")
        return torch.cat(parts)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Suspect:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class LocalSuspect(Suspect):
    """A model file on disk, in any source :func:`activeguard.models.sources.load` reads.

    Its input spec is the one its file carries (files ActiveGuard wrote), else ``owner_spec`` with
    the file's own row shape where it has one (a bare state dict, TorchScript or .pt2 file is queried
    as the owner is).
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        model_file: str | Path | None = None,
        model_class: str | None = None,
        owner_spec: inputs.InputSpec | None = None,
        task: str | None = None,
        overrides: inputs.SpecOverrides | None = None,
    ):
        super().__init__(str(path), batch_size)
        options = sources.SourceOptions(
            Path(model_file) if model_file is not None else None,
            model_class,
            overrides or inputs.SpecOverrides(),
            fallback=owner_spec,
            task=task,
        )
        try:
            self.loaded = sources.load(path, options)
        except FileNotFoundError as exc:
            raise SuspectError(f"suspect model file {path} does not exist") from exc
        except ValueError as exc:  # SourceError: one line that says why
            raise SuspectError(f"suspect {path} is not a loadable model: {exc}") from exc
        self.model = self.loaded.model
        self.input_shape = tuple(self.loaded.spec.shape)
        self.output_size = self.loaded.num_classes

    @torch.no_grad()
    def _query(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.model(x).float()
        except MODEL_ERRORS as exc:  # shape mismatches inside the network
            raise SuspectError(
                f"suspect {self.name} cannot take inputs of shape {tuple(x.shape[1:])}: {error_reason(exc)}"
            ) from exc


class EndpointSuspect(Suspect):
    """A model behind a JSON API: each batch (each row, for a ``{{row}}`` template) goes through the request
    template, and the scores or labels are read from each answer with the response path."""

    default_template: RequestTemplate = DEFAULT_TEMPLATE

    def __init__(self, name: str, batch_size: int, timeout_s: float, api: EndpointApi | None):
        super().__init__(name, batch_size)
        if timeout_s <= 0:
            raise SuspectError(f"timeout must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.api = api or EndpointApi()
        self.template = self.api.template or self.default_template

    def _ask(self, body: bytes) -> Any:
        """The decoded JSON answer to one request body; :class:`SuspectError` on any failure."""
        raise NotImplementedError

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.tolist()
        try:
            if self.template.per_row:
                values = [self.api.one_row(self._ask(self.template.render(row)), self.name) for row in rows]
            else:
                values = self.api.rows(self._ask(self.template.render(rows)), len(rows), self.name)
        except EndpointError as exc:
            raise SuspectError(str(exc)) from None
        return parse_outputs(values, len(rows), self.api.where(self.name))


class RemoteSuspect(EndpointSuspect):
    """A model behind ``POST <url>`` with a JSON body (``{"inputs": [...]}`` unless the API says otherwise),
    queried over one kept-alive connection."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        batch_size: int = DEFAULT_BATCH_SIZE,
        headers: dict[str, str] | None = None,
        api: EndpointApi | None = None,
    ):
        super().__init__(url, batch_size, timeout_s, api)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SuspectError(f"{url!r} is not an http(s) URL")
        if parts.path in ("", "/"):
            raise SuspectError(f"{url}: give the full prediction URL, e.g. http://host:8080/predictions/<model>")
        self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            **(headers or {}),
            **dict(self.api.headers),
        }
        try:
            port = parts.port
        except ValueError as exc:
            raise SuspectError(f"{url}: {exc}") from exc
        if parts.scheme == "https":
            self.conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, port, timeout=timeout_s, context=ssl.create_default_context()
            )
        else:
            self.conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout_s)

    def close(self) -> None:
        self.conn.close()

    def _post(self, body: bytes) -> tuple[int, bytes]:
        try:
            self.conn.request("POST", self.path, body=body, headers=self.headers)
            resp = self.conn.getresponse()
            return resp.status, resp.read()
        except ConnectionRefusedError as exc:
            raise SuspectError(f"cannot connect to {self.name}: connection refused (is the server running?)") from exc
        except TimeoutError as exc:  # socket.timeout is TimeoutError since Python 3.10
            raise SuspectError(f"{self.name} did not answer within the {self.timeout_s:g} s timeout") from exc
        except socket.gaierror as exc:
            raise SuspectError(f"cannot resolve the host of {self.name}: {exc.strerror or exc}") from exc
        except (http.client.HTTPException, OSError) as exc:
            raise SuspectError(f"connection to {self.name} failed: {type(exc).__name__}: {exc}") from exc

    def _ask(self, body: bytes) -> Any:
        try:
            status, raw = self._post(body)
        except SuspectError:
            self.conn.close()  # a half-used connection is not reused for the next call
            raise
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
            if status < 400:
                raise SuspectError(f"{self.name} did not answer JSON (HTTP {status}): {_excerpt(raw)}") from None
        if status >= 400:
            raise SuspectError(f"{self.name} answered HTTP {status}: {_reason(answer, raw)}")
        return answer


class GrpcSuspect(EndpointSuspect):
    """A model behind TorchServe's gRPC inference API, ``grpc://host:port/<model>[/<version>]``: one
    ``Predictions`` call per request body, the body in the ``input`` map under the API's key (``data``),
    headers as call metadata, the answer's ``prediction`` bytes read as JSON. Plaintext only, as
    TorchServe's gRPC API serves by default."""

    default_template = ROW_TEMPLATE

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        batch_size: int = DEFAULT_BATCH_SIZE,
        api: EndpointApi | None = None,
    ):
        super().__init__(url, batch_size, timeout_s, api)
        self.target, self.model, self.version = _grpc_address(url)
        if not self.api.grpc_input_key:
            raise SuspectError("the gRPC input key must not be empty")
        try:
            import grpc

            from activeguard_proto.torchserve import inference_pb2, inference_pb2_grpc
        except ImportError as exc:
            raise SuspectError(
                f"grpc:// suspects need grpcio ({exc.name} is missing): pip install -e '.[grpc]'"
            ) from None
        self._grpc, self._pb2 = grpc, inference_pb2
        self.metadata = tuple((name.lower(), value) for name, value in self.api.headers)
        self.channel = grpc.insecure_channel(self.target)
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _ask(self, body: bytes) -> Any:
        request = self._pb2.PredictionsRequest(
            model_name=self.model, model_version=self.version, input={self.api.grpc_input_key: body}
        )
        try:
            raw = self.stub.Predictions(request, timeout=self.timeout_s, metadata=self.metadata).prediction
        except self._grpc.RpcError as err:
            raise SuspectError(self._failure(err)) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise SuspectError(f"{self.name} did not answer JSON: {_excerpt(raw)}") from None

    def _failure(self, err: Any) -> str:
        """One line for a failed call: what the code means here, and the first line of TorchServe's words."""
        code = err.code() if callable(getattr(err, "code", None)) else None
        text = str(err.details() if callable(getattr(err, "details", None)) else err) or ""
        details = next((line.strip() for line in text.splitlines() if line.strip()), "no details")[:300]
        codes = self._grpc.StatusCode
        if code == codes.UNAVAILABLE:
            return f"cannot reach {self.name}: UNAVAILABLE (is TorchServe's gRPC inference API listening there?): {details}"
        if code == codes.NOT_FOUND or "ModelNotFoundException" in text:  # TorchServe 0.12 says INTERNAL
            return (
                f"{self.name}: TorchServe there has no model {self.model!r} ({getattr(code, 'name', code)}: {details})"
            )
        if code == codes.DEADLINE_EXCEEDED:
            return f"{self.name} did not answer within the {self.timeout_s:g} s timeout"
        return f"{self.name} answered gRPC {getattr(code, 'name', code)}: {details}"


def _grpc_address(url: str) -> tuple[str, str, str]:
    """``grpc://host[:port]/<model>[/<version>]`` → (``host:port``, model, version or '')."""
    parts = urllib.parse.urlsplit(url)
    names = [urllib.parse.unquote(p) for p in parts.path.split("/")[1:] if p]
    if parts.scheme != "grpc" or not parts.hostname:
        raise SuspectError(f"{url!r} is not a grpc:// URL")
    if not 1 <= len(names) <= 2 or parts.query:
        raise SuspectError(f"{url}: give the model, e.g. grpc://host:{DEFAULT_GRPC_PORT}/<model>[/<version>]")
    try:
        port = parts.port or DEFAULT_GRPC_PORT
    except ValueError as exc:
        raise SuspectError(f"{url}: {exc}") from exc
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}", names[0], names[1] if len(names) == 2 else ""


def _excerpt(raw: bytes, limit: int = 120) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return "an empty body"
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


def _reason(answer: Any, raw: bytes) -> str:
    """The reason a server gives in a JSON error body (TorchServe: "message"), else the body's start."""
    if isinstance(answer, dict):
        for key in ("message", "error", "reason", "detail"):
            if answer.get(key):
                return str(answer[key])
    return _excerpt(raw)


def parse_outputs(answer: Any, rows: int, name: str = "suspect") -> torch.Tensor:
    """Scores (rows, m) float32 or labels (rows,) int64 from ``{"outputs": ...}`` or a bare list."""
    if isinstance(answer, dict):
        if "outputs" not in answer:
            raise SuspectError(
                f"{name} answered a JSON object without an 'outputs' list (keys: "
                f"{', '.join(sorted(map(str, answer))) or 'none'})"
            )
        answer = answer["outputs"]
    if not isinstance(answer, list):
        raise SuspectError(f"{name} answered {type(answer).__name__}, expected a list of score vectors or labels")
    if len(answer) != rows:
        raise SuspectError(f"{name} answered {len(answer)} rows for {rows} queries")
    if all(isinstance(r, list) for r in answer):
        widths = {len(r) for r in answer}
        if len(widths) != 1:
            raise SuspectError(f"{name} answered ragged rows: row lengths {sorted(widths)}")
        if not all(_is_number(v) for r in answer for v in r):
            raise SuspectError(f"{name} answered score rows holding non-numbers")
        out = torch.tensor(answer, dtype=torch.float32)
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).any(1).sum())
            raise SuspectError(f"{name} answered NaN or infinite scores in {bad} of {rows} rows")
        return out
    if all(_is_number(v) for v in answer):
        if not all(isinstance(v, int) or (math.isfinite(v) and float(v).is_integer()) for v in answer):
            raise SuspectError(f"{name} answered a flat list that is not integer labels (NaN or fractions)")
        return torch.tensor([int(v) for v in answer], dtype=torch.int64)
    raise SuspectError(f"{name} answered rows that are neither score vectors nor integer labels")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_url(path_or_url: str | Path) -> bool:
    """Whether a suspect is an endpoint (http, https or grpc URL) rather than a model file."""
    return isinstance(path_or_url, str) and urllib.parse.urlsplit(path_or_url).scheme in SCHEMES


def open_suspect(
    path_or_url: str | Path,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    batch_size: int = DEFAULT_BATCH_SIZE,
    headers: dict[str, str] | None = None,
    api: EndpointApi | None = None,
    model_file: str | Path | None = None,
    model_class: str | None = None,
    owner_spec: inputs.InputSpec | None = None,
    task: str | None = None,
    overrides: inputs.SpecOverrides | None = None,
) -> Suspect:
    """A callable suspect from a model file, an ``http(s)://host:port/predictions/<name>`` URL or a
    ``grpc://host:port/<name>`` URL (TorchServe's gRPC inference API).

    ``timeout_s`` bounds each request (connect and answer); ``headers`` are sent with every HTTP
    request (e.g. an ``Authorization`` header); ``api`` says how to speak an endpoint's own JSON API
    (request template, response path, headers, gRPC input key) and is ignored for a file. A local file may be a state dict with its
    ``model_file`` (and ``model_class``); ``owner_spec`` is how to feed a file that does not say
    (the fingerprint's recorded spec), ``task`` what it does (the owner's: a regressor's suspect is not
    probed as a classifier), ``overrides`` what the command line says of the file's input. Raises
    :class:`SuspectError` on bad input.
    """
    if is_url(path_or_url):
        if model_file is not None or model_class is not None:
            raise SuspectError(f"{path_or_url}: a suspect model file or class applies to a local file, not an endpoint")
        if urllib.parse.urlsplit(str(path_or_url)).scheme == "grpc":
            return GrpcSuspect(str(path_or_url), timeout_s=timeout_s, batch_size=batch_size, api=api)
        return RemoteSuspect(str(path_or_url), timeout_s=timeout_s, batch_size=batch_size, headers=headers, api=api)
    if isinstance(path_or_url, str) and "://" in path_or_url:
        raise SuspectError(f"{path_or_url!r}: only http://, https:// and grpc:// endpoints are supported")
    return LocalSuspect(
        path_or_url,
        batch_size=batch_size,
        model_file=model_file,
        model_class=model_class,
        owner_spec=owner_spec,
        task=task,
        overrides=overrides,
    )


def probabilities(out: torch.Tensor, name: str = "suspect") -> torch.Tensor:
    """Score rows as probability vectors (:func:`activeguard.audit.base.as_probabilities`). Endpoints usually
    answer softmax probabilities and checkpoints give logits; comparing outputs (TAFA) needs one scale.
    Labels alone cannot be compared: that raises :class:`SuspectError`."""
    probs = as_probabilities(out)
    if probs is None:
        raise SuspectError(f"{name} answered labels only, but this audit compares score vectors")
    return probs
