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
  ``{"outputs": [[...], ...]}``, or a bare list of score vectors, or a bare list of labels.

Nothing is retried: the first failure raises :class:`SuspectError` (a ``ValueError``, so the CLI
reports it as an input error, exit 2) saying what went wrong - connection refused, timeout, an
HTTP error status (with the server's reason when its body is JSON), an answer that is not JSON,
the wrong number of rows, NaN or infinite values, ragged rows, or a local model that cannot take
the fingerprint's input shape.
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
from activeguard.models import inputs, sources

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_BATCH_SIZE = 64  # 64 MNIST rows are ~1 MB of JSON, far below TorchServe's 6.5 MB default request limit


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


class RemoteSuspect(Suspect):
    """A model behind ``POST <url>`` with a JSON body ``{"inputs": [...]}``, queried over one kept-alive connection."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        batch_size: int = DEFAULT_BATCH_SIZE,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(url, batch_size)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SuspectError(f"{url!r} is not an http(s) URL")
        if parts.path in ("", "/"):
            raise SuspectError(f"{url}: give the full prediction URL, e.g. http://host:8080/predictions/<model>")
        if timeout_s <= 0:
            raise SuspectError(f"timeout must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
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

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        try:
            status, raw = self._post(json.dumps({"inputs": x.tolist()}).encode())
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
        return parse_outputs(answer, len(x), self.name)


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
    return isinstance(path_or_url, str) and urllib.parse.urlsplit(path_or_url).scheme in ("http", "https")


def open_suspect(
    path_or_url: str | Path,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    batch_size: int = DEFAULT_BATCH_SIZE,
    headers: dict[str, str] | None = None,
    model_file: str | Path | None = None,
    model_class: str | None = None,
    owner_spec: inputs.InputSpec | None = None,
    task: str | None = None,
    overrides: inputs.SpecOverrides | None = None,
) -> Suspect:
    """A callable suspect from a model file or an ``http(s)://host:port/predictions/<name>`` URL.

    ``timeout_s`` bounds each HTTP request (connect and answer); ``headers`` are sent with every
    request (e.g. an ``Authorization`` header). A local file may be a state dict with its
    ``model_file`` (and ``model_class``); ``owner_spec`` is how to feed a file that does not say
    (the fingerprint's recorded spec), ``task`` what it does (the owner's: a regressor's suspect is not
    probed as a classifier), ``overrides`` what the command line says of the file's input. Raises
    :class:`SuspectError` on bad input.
    """
    if is_url(path_or_url):
        if model_file is not None or model_class is not None:
            raise SuspectError(f"{path_or_url}: a suspect model file or class applies to a local file, not an endpoint")
        return RemoteSuspect(str(path_or_url), timeout_s=timeout_s, batch_size=batch_size, headers=headers)
    if isinstance(path_or_url, str) and "://" in path_or_url:
        raise SuspectError(f"{path_or_url!r}: only http:// and https:// endpoints are supported")
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
