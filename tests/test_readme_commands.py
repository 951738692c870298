"""Every `activeguard` command shown in README.md and docs/*.md parses with the real CLI parser.

Nothing is run: each command found in a fenced ```bash block is handed to the parser's
``parse_args``, which exits with status 2 on an unknown command or flag (0 for ``--help``).
Also: README.md has at most 300 lines, and every relative link in it and in the docs pages points
to an existing file (and heading).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from activeguard.cli.app import build_parser  # the one place that names the CLI module

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300
# written by someone else; the link check skips it only while it does not exist yet
PENDING_LINK_TARGETS = {ROOT / "docs" / "architecture.md"}

COMMAND_NAMES = {"activeguard", ".venv/bin/activeguard"}
PLACEHOLDER = "SUBSTITUTED"  # what a $(...) or $VAR substitution stands for: one opaque argument
SHELL_PREFIXES = {"do", "then", "else", "time", "exec", "nohup", "!"}  # words that may precede a command
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
VARIABLE = re.compile(r"\$(?:\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*|[!?$#@*0-9-])")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title"), images too
MENTIONS_CLI = re.compile(r"(^|[\s/])activeguard(\s|$)")


@dataclass(frozen=True)
class Command:
    file: str  # relative to the repository root
    line: int  # where the (possibly continued) shell line starts
    text: str  # the command as written, comments and separators removed

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def bash_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """The fenced ```bash blocks of a Markdown file: (line number of the block's first line, its lines)."""
    blocks, fence, lines = [], None, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if fence is None:
            match = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if match:
                fence, language, start, lines = match.group(1), match.group(2), number + 1, []
        elif stripped.startswith(fence) and not stripped.strip(fence[0]):
            if language in ("bash", "sh", "shell"):
                blocks.append((start, lines))
            fence = None
        else:
            lines.append(line)
    return blocks


def logical_lines(start: int, lines: list[str]) -> list[tuple[int, str]]:
    """Joins backslash-continued lines; each result keeps the number of its first line."""
    out, buffer, first = [], [], start
    for offset, line in enumerate(lines):
        if not buffer:
            first = start + offset
        if line.rstrip().endswith("\\"):
            buffer.append(line.rstrip()[:-1])
            continue
        buffer.append(line)
        out.append((first, " ".join(part.strip() for part in buffer)))
        buffer = []
    if buffer:
        out.append((first, " ".join(part.strip() for part in buffer)))
    return out


def split_commands(line: str) -> tuple[list[str], list[str]]:
    """Splits a shell line on ; && || | and &, outside quotes and $(...), and drops a # comment.

    Returns the commands and the contents of every $(...) substitution met (commands of their own).
    """
    commands, substitutions, current = [], [], []
    quote, depth, sub_start, i = None, 0, 0, 0
    while i < len(line):
        ch = line[i]
        if depth:  # inside $(...): only its parentheses matter here
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                substitutions.append(line[sub_start:i])
        elif quote == "'":
            quote = None if ch == "'" else quote
        elif ch == "\\":
            current.append(line[i : i + 2])
            i += 2
            continue
        elif line.startswith("$(", i):
            depth, sub_start = 1, i + 2
            current.append("$(")
            i += 2
            continue
        elif ch == '"':
            quote = None if quote else '"'
        elif quote is None:
            if ch == "'":
                quote = "'"
            elif ch == "#" and (i == 0 or line[i - 1].isspace()):
                break
            elif ch in ";|&" and not (ch == "&" and (line[i - 1 : i] in ("<", ">") or line[i + 1 : i + 2] == ">")):
                commands.append("".join(current))  # 2>&1 and &> are redirections, not separators
                current = []
                i += 2 if line.startswith(("&&", "||"), i) else 1
                continue
        current.append(ch)
        i += 1
    commands.append("".join(current))
    return [c.strip() for c in commands if c.strip()], substitutions


def opaque_substitutions(command: str) -> str:
    """Replaces every $(...) (balanced) and $VAR by the placeholder, so shlex sees one argument."""
    out, i = [], 0
    while i < len(command):
        if command.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(command) and depth:
                depth += {"(": 1, ")": -1}.get(command[j], 0)
                j += 1
            out.append(PLACEHOLDER)
            i = j
            continue
        match = VARIABLE.match(command, i)
        if match:
            out.append(PLACEHOLDER)
            i = match.end()
            continue
        out.append(command[i])
        i += 1
    return "".join(out)


def cli_arguments(command: str) -> list[str] | None:
    """The arguments after `activeguard` if the command runs the CLI, else None (ValueError: bad quoting)."""
    tokens = shlex.split(opaque_substitutions(command))
    while tokens and (tokens[0] in SHELL_PREFIXES or ASSIGNMENT.match(tokens[0])):
        tokens.pop(0)
    if not tokens or tokens[0] not in COMMAND_NAMES:
        return None
    return tokens[1:]


def documented_commands() -> list[Command]:
    found = []
    for path in DOC_FILES:
        for start, lines in bash_blocks(path):
            for number, line in logical_lines(start, lines):
                pending = [line]
                while pending:
                    commands, substitutions = split_commands(pending.pop(0))
                    pending.extend(substitutions)
                    for command in commands:
                        try:
                            runs_cli = cli_arguments(command) is not None
                        except ValueError:  # unbalanced quotes: its test reports it
                            runs_cli = bool(MENTIONS_CLI.search(command))
                        if runs_cli:
                            found.append(Command(str(path.relative_to(ROOT)), number, command))
    return found


COMMANDS = documented_commands()


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def test_the_docs_show_cli_commands():
    """Guards the extraction itself: the README's set-up command is found, and commands in the docs pages."""
    assert any(c.file == "README.md" and c.text == ".venv/bin/activeguard demo" for c in COMMANDS), COMMANDS
    assert {c.file for c in COMMANDS} - {"README.md"}, "no activeguard command found in docs/*.md"


def test_every_cli_plugin_is_importable(parser):
    """A plugin that fails to import becomes a bare stub command, which would fail every command below."""
    stubs = [
        f"{action.dest}: {action.help}"
        for group in parser._subparsers._group_actions  # argparse keeps the subcommands here
        for action in getattr(group, "_choices_actions", [])
        if str(action.help).startswith("(unavailable")
    ]
    assert not stubs, f"CLI plugins could not be loaded: {stubs}"


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_parses(parser, command: Command):
    try:
        arguments = cli_arguments(command.text)
    except ValueError as exc:
        pytest.fail(f"{command}\n  is not a valid shell command ({exc})")
    wants_help = "-h" in arguments or "--help" in arguments
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            parser.parse_args(arguments)
            status = None
        except SystemExit as exc:
            status = exc.code
    if wants_help:
        assert status == 0, f"{command}\n  --help did not parse (exit {status}):\n{output.getvalue()}"
    else:
        assert status is None, f"{command}\n  the CLI refuses it (exit {status}):\n{output.getvalue()}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, - for spaces)."""
    anchors, seen = set(), {}
    for line in without_code(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def without_code(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(path: Path):
    broken = []
    for target in LINK.findall(without_code(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # a URL or mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path.resolve()
        if not resolved.exists():
            if resolved not in PENDING_LINK_TARGETS:
                broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.relative_to(ROOT)} has broken links: {broken}"
