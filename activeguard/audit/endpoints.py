"""How to talk to a suspect's own JSON API: a request template, a response path and extra headers.

A pirate may serve a stolen model behind any JSON API, so a URL audit is told where the queries go in a
request and where the answers are in a response; nothing here does I/O (:mod:`activeguard.audit.remote`
sends the requests).

**Request template**: JSON text with exactly one placeholder where a JSON value goes:

* ``{{rows}}``: the list of rows of one batch (``--batch-size`` rows per request), e.g.
  ``{"instances": {{rows}}}``; the default is ``{"inputs": {{rows}}}``, what ActiveGuard's handlers take;
* ``{{row}}``: one row, one request per row, e.g. ``{"image": {{row}}}``.

Spaces inside the braces are allowed (``{{ rows }}``); the placeholder may not stand inside a string
or as a key. A row is the query as nested lists of numbers (e.g. 1 × 28 × 28 for MNIST).

**Response path**: where the scores or labels are in a JSON answer, a small subset of jq:

* ``key`` or ``.key``: a key of an object; ``a.b.c`` for nested objects;
* ``[2]``, ``[-1]``: an index into a list; ``["odd.key"]``: a key written as a JSON string (dots, brackets);
* ``[*]``: every element of a list, the rest of the path applied to each, e.g. ``predictions[*].probs``;
* ``.``: the whole answer; ``auto`` (the default): ``outputs`` in an object, else the whole answer.

With ``{{rows}}`` the path must reach one score vector or label per row (``predictions[*].probs``,
``outputs``, ``predictions[*].label``); with ``{{row}}`` it must reach that row's score vector or label
(``probs``, ``label``), a batch of one (``[[...]]``) being taken as its one row.

Every parse and extraction error is an :class:`EndpointError` (a ``ValueError``): one line that names
the template, path or header and what was found instead; a header's value is never shown.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROWS, ROW = "rows", "row"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
DEFAULT_TEMPLATE_TEXT = '{"inputs": {{rows}}}'
AUTO = "auto"
MAX_STEPS = 64  # a response path is a few keys, not a program
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP token (RFC 9110)
GRPC_KEY = re.compile(r"[0-9a-z_.-]+")  # what gRPC allows as metadata key (lower case)


class EndpointError(ValueError):
    """A request template, response path or header that cannot be used, or an answer the path does not fit."""


# --- request templates ---------------------------------------------------------------------------


class _Mark:
    """Stands for the placeholder while the template is checked as JSON."""


_MARK = _Mark()


@dataclass(frozen=True)
class RequestTemplate:
    """A request body with the queries in place of one placeholder: ``prefix + json(value) + suffix``."""

    text: str
    prefix: str
    suffix: str
    per_row: bool  # {{row}}: one request per row; {{rows}}: one per batch

    @classmethod
    def parse(cls, text: str) -> RequestTemplate:
        """Check ``text`` once, at start: exactly one known placeholder, standing as a JSON value."""
        found = list(PLACEHOLDER.finditer(text))
        unknown = sorted({m.group(1) for m in found} - {ROWS, ROW})
        if unknown:
            raise EndpointError(
                f"the request template has an unknown placeholder {{{{{unknown[0]}}}}}: "
                "use {{rows}} (a batch of rows) or {{row}} (one row per request)"
            )
        if len(found) != 1:
            what = "no placeholder" if not found else f"{len(found)} placeholders"
            raise EndpointError(
                f"the request template has {what}: put exactly one {{{{rows}}}} (a batch of rows) or {{{{row}}}} "
                '(one row per request) where the inputs go, e.g. {"instances": {{rows}}}'
            )
        match = found[0]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise EndpointError("the request template is not valid UTF-8 text") from None
        _check_json(text, match)
        return cls(text, text[: match.start()], text[match.end() :], match.group(1) == ROW)

    def render(self, value: Any) -> bytes:
        """The request body for ``value`` (a row or a list of rows as nested lists of numbers)."""
        return (self.prefix + json.dumps(value) + self.suffix).encode("utf-8")

    @property
    def placeholder(self) -> str:
        return "{{row}}" if self.per_row else "{{rows}}"


def _check_json(text: str, match: re.Match) -> None:
    """The template must be JSON with the placeholder standing as a value. Two probes, the placeholder
    replaced by a filler padded to its length (a JSON error's column is then the template's own): ``0``
    checks the JSON around it (and that it holds no NaN of its own), ``NaN`` that the placeholder stands
    alone where a value goes: the parser turns that one constant into a mark, which must be a value."""

    def probe(filler: str) -> str:
        return text[: match.start()] + filler.ljust(len(match.group(0))) + text[match.end() :]

    def no_constant(name: str) -> Any:
        raise EndpointError(f"the request template holds {name}, which is not JSON")

    try:
        json.loads(probe("0"), parse_constant=no_constant)
        value = json.loads(probe("NaN"), parse_constant=lambda _name: _MARK)
    except json.JSONDecodeError as exc:
        raise EndpointError(
            f"the request template is not valid JSON with its placeholder filled in: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno}); the placeholder stands alone where a value goes"
        ) from None
    except RecursionError:
        raise EndpointError("the request template is nested too deeply") from None
    except EndpointError:
        raise
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise EndpointError(f"the request template is not usable JSON: {exc}") from None
    if not _holds_mark(value):
        raise EndpointError(
            f"the request template's {match.group(0)} stands inside a string: it must stand where a JSON value "
            'goes, without quotes, e.g. {"instances": {{rows}}}'
        )


def _holds_mark(value: Any) -> bool:
    """Whether the mark is one of the values (walked without recursion: templates may nest deeply)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if item is _MARK:
            return True
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def read_template(argument: str) -> RequestTemplate:
    """``--request-template``: the JSON text itself, or ``@file.json`` to read it from a file."""
    text = argument
    if argument.startswith("@"):
        try:
            text = Path(argument[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise EndpointError(f"cannot read the request template {argument[1:]}: {reason}") from None
    return RequestTemplate.parse(text)


DEFAULT_TEMPLATE = RequestTemplate.parse(DEFAULT_TEMPLATE_TEXT)
ROW_TEMPLATE = RequestTemplate.parse("{{row}}")  # the row's JSON alone: the gRPC default


# --- response paths ------------------------------------------------------------------------------


EACH = object()  # the [*] step


def _step_text(step: Any) -> str:
    if step is EACH:
        return "[*]"
    if isinstance(step, int):
        return f"[{step}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", step):
        return f".{step}"
    return f"[{json.dumps(step)}]"


def _join(steps: tuple) -> str:
    """Steps as path text (``predictions[*].probs``); ``.`` for none."""
    text = "".join(_step_text(s) for s in steps)
    return (text[1:] if text.startswith(".") else text) or "."


def describe(value: Any) -> str:
    """What a JSON value is, for an error: 'an object with keys a, b', 'a list of 3', 'the string "x"'."""
    if isinstance(value, dict):
        keys = [str(k) for k in list(value)[:8]]
        more = ", …" if len(value) > 8 else ""
        return f"an object with keys {', '.join(keys)}{more}" if keys else "an empty object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, str):
        return f"the string {json.dumps(value[:40] + ('…' if len(value) > 40 else ''))}"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if value is None:
        return "null"
    return f"the number {value!r}"


@dataclass(frozen=True)
class ResponsePath:
    """Where the scores or labels are in an answer; ``steps`` are keys (str), indexes (int) and ``EACH``."""

    text: str
    steps: tuple = ()

    @classmethod
    def parse(cls, text: str) -> ResponsePath:
        return cls(text.strip(), _parse_steps(text.strip()))

    def __str__(self) -> str:
        return _join(self.steps)

    def extract(self, answer: Any) -> Any:
        """The value the path reaches; every ``[*]`` makes a list of what the rest reaches in each element."""
        return self._walk(answer, 0, ())

    def _walk(self, value: Any, i: int, at: tuple) -> Any:
        """``at``: the concrete steps taken so far (``[*]`` as the element's index), to name a failure's place."""
        if i == len(self.steps):
            return value
        step, here = self.steps[i], _join(at) if at else "the answer"
        if step is EACH:
            if not isinstance(value, list):
                raise self._error(f"{here} is {describe(value)}, not a list to map [*] over")
            return [self._walk(item, i + 1, (*at, n)) for n, item in enumerate(value)]
        if isinstance(step, int):
            if not isinstance(value, list):
                raise self._error(f"{here} is {describe(value)}, not a list to index with [{step}]")
            if not -len(value) <= step < len(value):
                raise self._error(f"{here} is {describe(value)}: no index {step}")
            return self._walk(value[step], i + 1, (*at, step))
        if not isinstance(value, dict):
            raise self._error(f"{here} is {describe(value)}, not an object with key {json.dumps(step)}")
        if step not in value:
            raise self._error(f"{here} has no key {json.dumps(step)}: it is {describe(value)}")
        return self._walk(value[step], i + 1, (*at, step))

    def _error(self, what: str) -> EndpointError:
        return EndpointError(f"response path {self.text}: {what}")


def _parse_steps(text: str) -> tuple:
    """``a.b[0][*]["c.d"]`` → ("a", "b", 0, EACH, "c.d"); ``.`` → (); raises :class:`EndpointError`."""
    if not text:
        raise EndpointError("the response path is empty: give e.g. predictions[*].probs, or . for the whole answer")
    if text == ".":
        return ()
    steps: list = []
    i = 1 if text.startswith(".") else 0
    while i < len(text):
        if len(steps) >= MAX_STEPS:
            raise EndpointError(f"the response path {text!r} has more than {MAX_STEPS} steps")
        if text[i] == "[":
            step, i = _bracket(text, i)
        else:
            if steps and text[i] != ".":
                raise _syntax(text, i, "expected '.' or '[' after a step")
            if steps:
                i += 1
            end = i
            while end < len(text) and text[end] not in ".[]":
                end += 1
            if end == i:
                raise _syntax(text, i, "empty key")
            step, i = text[i:end], end
            if step != step.strip():
                raise _syntax(text, i, f'key {step!r} has spaces at its ends: write it as ["{step}"]')
        steps.append(step)
    return tuple(steps)


def _bracket(text: str, i: int) -> tuple[Any, int]:
    """One ``[...]`` step starting at ``text[i] == '['``: (step, index after the ']')."""
    close = text.find("]", i)
    inner = text[i + 1 : close] if close > 0 else ""
    if inner.strip() == "*":
        return EACH, close + 1
    if re.fullmatch(r"\s*-?\d{1,9}\s*", inner):
        return int(inner), close + 1
    if text[i + 1 : i + 2] == '"':
        try:
            key, end = json.JSONDecoder().raw_decode(text, i + 1)
        except ValueError:
            raise _syntax(text, i + 1, "a key in brackets must be a JSON string") from None
        if text[end : end + 1] == "]":
            return key, end + 1
        raise _syntax(text, end, "expected ']' after the quoted key")
    if close < 0:
        raise _syntax(text, i, "'[' without ']'")
    raise _syntax(text, i, 'inside [ ] put *, an integer index, or a quoted key ["key"]')


def _syntax(text: str, i: int, what: str) -> EndpointError:
    return EndpointError(f"the response path {text!r} is not valid at character {i + 1}: {what}")


def parse_response_path(text: str | None) -> ResponsePath | None:
    """``--response-path``: None (or ``auto``) keeps the default, ``outputs`` in an object else the answer."""
    if text is None or text.strip() == AUTO:
        return None
    return ResponsePath.parse(text)


# --- headers -------------------------------------------------------------------------------------


def parse_header(text: str, position: int = 1) -> tuple[str, str]:
    """``--header 'Name: value'`` → (name, value). Errors say which --header, never its value (an API key)."""
    name, colon, value = text.partition(":")
    which = f"--header number {position}"
    if not colon:
        raise EndpointError(f"{which} has no ':': write it as 'Name: value' (its text is not shown)")
    name, value = name.strip(), value.strip()
    if not HEADER_NAME.fullmatch(name):
        raise EndpointError(f"{which}: the name before ':' must be letters, digits and -, without spaces")
    if not all(c == "\t" or " " <= c <= "~" for c in value):
        raise EndpointError(f"{which} ({name}): the value must be printable ASCII (no line breaks)")
    return name, value


# --- the whole API -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointApi:
    """How one suspect's API is spoken: ``template`` None is the transport's default (HTTP: ``{"inputs":
    {{rows}}}``; gRPC: ``{{row}}``), ``response`` None the ``auto`` path."""

    template: RequestTemplate | None = None
    response: ResponsePath | None = None
    headers: tuple[tuple[str, str], ...] = ()
    grpc_input_key: str = "data"

    def rows(self, answer: Any, count: int, name: str) -> list:
        """A batch answer's rows: the path's value, which must be a list (one score vector or label per row)."""
        value = self._value(answer, name)
        if not isinstance(value, list):
            raise EndpointError(f"{self.where(name)} gave {describe(value)}, expected a list of {count} rows")
        return value

    def one_row(self, answer: Any, name: str) -> Any:
        """A one-row answer's score vector or label (a batch of one, ``[[...]]``, is taken as its row)."""
        value = self._value(answer, name)
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
            value = value[0]
        if isinstance(value, (dict, str, bool)) or value is None:
            raise EndpointError(f"{self.where(name)} gave {describe(value)}, expected one score vector or label")
        return value

    def _value(self, answer: Any, name: str) -> Any:
        if self.response is not None:
            try:
                return self.response.extract(answer)
            except EndpointError as exc:
                raise EndpointError(f"{name}: {exc}") from None
        if isinstance(answer, dict):
            if "outputs" not in answer:
                raise EndpointError(
                    f"{name} answered {describe(answer)} and no 'outputs' list: say where the scores are with "
                    "--response-path, e.g. predictions[*].probs"
                )
            return answer["outputs"]
        return answer

    def where(self, name: str) -> str:
        """The suspect's name for an error about its answer, with the response path when one was given."""
        return name if self.response is None else f"{name} (response path {self.response.text})"
