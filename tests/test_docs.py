"""The documentation cannot rot.

- the generated configuration reference (docs/reference.md) is current and complete;
- every fenced block in docs/**/*.md and README.md is checked (the conventions are in
  docs/index.md, "These pages are tested"): ```toml blocks are complete configs that
  `lmsae config check` accepts (a block right after `<!-- docs-test: fragment -->` is only parsed
  as TOML); every `lmsae ...` line of a shell block names an existing command and its options;
  ```python blocks compile; ```json blocks parse; shell and python blocks right after
  `<!-- docs-test: run -->` are executed from the repository root;
- relative links (and their #anchors) between pages resolve;
- every hook, task, architecture and component of the shipped distributions, and every command,
  is documented, and every page is in mkdocs.yml's nav and in docs/index.md.

Everything runs in this process except run blocks: the registry and the click command tree are
built once per session, and run blocks fork a warm interpreter for `lmsae` and python (see
`serve_warm`; LMSAE_DOCS_COLD=1 starts the real programs instead). Test ids are `path:line` of the
block or line they check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DISTRIBUTIONS = ("lmsae-core", "lmsae-crosscoder", "lmsae-clt", "lmsae-lorsa", "lmsae-molt")
COMMAND = "lmsae config reference " + " ".join(f"--distribution {d}" for d in DISTRIBUTIONS) + " > docs/reference.md"
RUN_TIMEOUT_S = 120


# --- the generated reference ---------------------------------------------------------------------


def test_configuration_reference_is_current():
    from lmsae.config.reference import render_reference
    from lmsae.registry import load_registry

    expected = render_reference(load_registry().restricted(set(DISTRIBUTIONS)))
    committed = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    assert committed == expected, f"docs/reference.md is out of date: regenerate it with `{COMMAND}`"


def test_reference_documents_every_component_and_field():
    import attrs

    from lmsae.registry import load_registry

    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    registry = load_registry().restricted(set(DISTRIBUTIONS))
    for entry in registry.entries():
        spec = entry.spec
        if not hasattr(spec, "config_class"):
            continue
        assert f"`{entry.name}`" in text, entry.name
        for field in attrs.fields(spec.config_class):
            if not field.name.startswith("_"):
                assert f"| `{field.name}` |" in text, f"{entry.kind} {entry.name}: {field.name}"


# --- reading Markdown ----------------------------------------------------------------------------

MARKER_RE = re.compile(r"^\s*<!--\s*docs-test:\s*(\S*?)\s*-->\s*$")
#: marker -> the block languages it may precede
MARKERS = {"fragment": {"toml"}, "run": {"bash", "sh", "shell", "python", "py"}}
FENCE_RE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
SHELL_LANGS = {"bash", "sh", "shell", "zsh", "console", "shell-session"}
PYTHON_LANGS = {"python", "py"}


@dataclass(frozen=True)
class Block:
    """A fenced code block: ``line`` is the 1-based line of its opening fence."""

    path: str
    line: int
    lang: str
    text: str
    marker: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    def file_line(self, block_line: int) -> int:
        """The file line of the block's 1-based line ``block_line``."""
        return self.line + block_line


@dataclass
class Page:
    """A Markdown file split into fenced blocks and prose (the lines outside every fence)."""

    path: str
    blocks: list[Block] = dataclasses.field(default_factory=list)
    prose: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)


def parse_markdown(text: str, path: str) -> Page:
    """Fenced blocks (CommonMark fences: ``` or ~~~, closed by a fence of the same character at
    least as long, so a ```` block may show ``` blocks), the docs-test marker of each block,
    and the prose lines. A marker applies to the next fence when only blank lines separate them."""
    page = Page(path)
    lines = text.splitlines()
    pending: tuple[int, str] | None = None  # (line, marker) waiting for its fence
    i = 0
    while i < len(lines):
        line, lineno = lines[i], i + 1
        opening = FENCE_RE.match(line)
        if opening and not (opening["fence"][0] == "`" and "`" in opening["info"]):
            indent, fence = len(opening["indent"]), opening["fence"]
            lang = (opening["info"].strip().split() or [""])[0].strip("{}.").lower()
            closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
            body: list[str] = []
            j = i + 1
            while j < len(lines) and not closing.match(lines[j]):
                body.append(re.sub(rf"^ {{0,{indent}}}", "", lines[j]))
                j += 1
            if j == len(lines):
                page.problems.append(f"{path}:{lineno}: the {fence} fence is never closed")
            marker = None
            if pending is not None:
                marker_line, marker = pending
                pending = None
                if lang not in MARKERS[marker]:
                    page.problems.append(f"{path}:{marker_line}: `docs-test: {marker}` may only precede "
                                         f"{'/'.join(sorted(MARKERS[marker]))} blocks, not a {lang or 'plain'!r} one")
                    marker = None
            page.blocks.append(Block(path, lineno, lang, "\n".join(body) + ("\n" if body else ""), marker))
            i = j + 1
            continue
        found = MARKER_RE.match(line)
        if found:
            if pending is not None:
                page.problems.append(f"{path}:{pending[0]}: `docs-test: {pending[1]}` is not followed by a "
                                     "fenced block")
            if found[1] in MARKERS:
                pending = (lineno, found[1])
            else:
                page.problems.append(f"{path}:{lineno}: unknown marker `docs-test: {found[1]}`; "
                                     f"use one of {', '.join(sorted(MARKERS))}")
                pending = None
        else:
            if pending is not None and line.strip():
                page.problems.append(f"{path}:{pending[0]}: `docs-test: {pending[1]}` must be immediately "
                                     f"followed by a fenced block (found text on line {lineno})")
                pending = None
            page.prose.append((lineno, line))
        i += 1
    if pending is not None:
        page.problems.append(f"{path}:{pending[0]}: `docs-test: {pending[1]}` is not followed by a fenced block")
    return page


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _pages() -> dict[str, Page]:
    files = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    return {_rel(f): parse_markdown(f.read_text(encoding="utf-8"), _rel(f)) for f in files if f.exists()}


PAGES = _pages()
DOC_PAGES = sorted(p for p in PAGES if p.startswith("docs/"))
BLOCKS = [b for page in PAGES.values() for b in page.blocks]


def _param(items, id_of=lambda x: x.id):
    return pytest.mark.parametrize("item", items, ids=[id_of(x) for x in items])


# --- shared fixtures: one registry and one command tree per session ------------------------------


@pytest.fixture(scope="session")
def registry():
    from lmsae.registry import load_registry

    return load_registry()


@pytest.fixture(scope="session")
def cli_tree(registry):
    """The `lmsae` click group with every plugin's commands, and the distribution of each top-level command."""
    from lmsae.cli import _add_plugin_commands, build_cli

    cli = build_cli(registry)
    with contextlib.redirect_stderr(io.StringIO()):
        added = _add_plugin_commands(cli, registry)
    owners = {name: "lmsae-core" for name in cli.commands}
    owners.update({name: dist for name, dist, _ in added})
    return cli, owners


def test_markdown_files_were_found():
    assert "docs/reference.md" in PAGES and "README.md" in PAGES


@_param(list(PAGES), id_of=str)
def test_markers_and_fences_are_well_formed(item):
    problems = PAGES[item].problems
    assert not problems, "\n".join(problems)


# --- ```toml blocks --------------------------------------------------------------------------------

TOML_BLOCKS = [b for b in BLOCKS if b.lang == "toml"]


def _toml_error(block: Block, exc: tomllib.TOMLDecodeError) -> str:
    # tomllib counts lines from the block's first line; say which line of the file that is
    msg = re.sub(r"at line (\d+)", lambda m: f"at {block.path}:{block.file_line(int(m[1]))}", str(exc))
    return f"{block.id}: not valid TOML: {msg}"


@_param(TOML_BLOCKS)
def test_toml_block_is_a_valid_config(item, registry, tmp_path, monkeypatch):
    """What `lmsae config check FILE` does (read, then validate against every installed plugin),
    in process. Validation does not depend on where FILE lies; it runs with the repository root as
    the working directory, like the examples."""
    from lmsae.cli import load_run_config
    from lmsae.errors import LmsaeError

    problem = None
    try:
        tomllib.loads(item.text)
    except tomllib.TOMLDecodeError as exc:
        problem = _toml_error(item, exc)
    if problem is None and item.marker != "fragment":
        config_file = tmp_path / "block.toml"
        config_file.write_text(item.text, encoding="utf-8")
        monkeypatch.chdir(ROOT)
        try:
            load_run_config(registry, config_file)
        except LmsaeError as exc:
            problem = (f"{item.id}: `lmsae config check` rejects this block (put `<!-- docs-test: fragment -->` "
                       f"right before the fence if it is deliberately partial):\n"
                       + str(exc).replace(str(config_file), item.id))
    if problem:
        pytest.fail(problem, pytrace=False)


JSON_BLOCKS = [b for b in BLOCKS if b.lang in ("json", "jsonl")]


@_param(JSON_BLOCKS)
def test_json_block_parses(item):
    """A ```json block is one JSON document, or JSON lines (as in metrics.jsonl)."""
    import json

    try:
        json.loads(item.text)
        return
    except json.JSONDecodeError as exc:
        first = exc
    problems = []
    for n, line in enumerate(item.text.splitlines(), start=1):
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{item.path}:{item.file_line(n)}: {exc.msg}")
    assert not problems, f"{item.id}: neither JSON ({first.msg} at block line {first.lineno}) nor JSON lines:\n" + \
        "\n".join(problems)


# --- `lmsae ...` lines in shell blocks ---------------------------------------------------------------


@dataclass(frozen=True)
class CommandLine:
    """An `lmsae` invocation found in a shell block: ``args`` follow the program name."""

    path: str
    line: int
    source: str
    args: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ";;", "(", ")", "|&"}
REDIRECTIONS = re.compile(r"^[<>]+&?$|^&>>?$")
WRAPPERS = {"time", "exec", "env", "command", "do", "then", "else", "if", "while", "until", "!", "{"}


def _segments(command: str) -> Iterator[list[str]]:
    """The simple commands of one shell command line (split at |, &&, ;, ...), redirections dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segment: list[str] = []
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in SHELL_OPERATORS:
            yield segment
            segment = []
        elif REDIRECTIONS.match(token):
            skip_next = True
        else:
            segment.append(token)
    yield segment


def lmsae_args(segment: list[str]) -> list[str] | None:
    """The arguments after the program when ``segment`` runs lmsae (`lmsae`, `.venv/bin/lmsae`,
    `VAR=x lmsae`, `nice -n 19 lmsae`, `python -m lmsae`, `torchrun ... -m lmsae`), else None."""
    words = list(segment)
    while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] in WRAPPERS):
        words.pop(0)
    while words and words[0] == "nice":
        words = words[3:] if words[1:2] == ["-n"] else words[1:]
    if not words:
        return None
    if words[0].rsplit("/", 1)[-1] == "lmsae":
        return words[1:]
    for k, word in enumerate(words[:-1]):
        if word == "-m" and words[k + 1] in ("lmsae", "lmsae.cli"):
            return words[k + 2:]
    return None


def shell_commands(block: Block) -> list[CommandLine]:
    """Every lmsae invocation of a shell block. In ```console blocks only `$ ...` and `lmsae ...`
    lines are commands (the rest is output); continuation lines (ending in a backslash) are joined,
    heredoc bodies skipped."""
    found: list[CommandLine] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        start, line = i, lines[i]
        i += 1
        stripped = line.strip()
        if stripped.startswith("$ "):
            stripped = stripped[2:]
        elif block.lang in ("console", "shell-session") and not stripped.startswith("lmsae "):
            continue
        while stripped.endswith("\\") and i < len(lines):
            stripped = stripped[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", stripped)
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc[1]:
                i += 1
            i += 1
        try:
            segments = list(_segments(stripped))
        except ValueError:  # unbalanced quotes: not a command line we can read
            continue
        for segment in segments:
            args = lmsae_args(segment)
            if args is not None:
                found.append(CommandLine(block.path, block.file_line(start + 1), stripped, tuple(args)))
    return found


def _option_names(command, ctx) -> dict[str, object]:
    import click

    names: dict[str, object] = {name: None for name in command.get_help_option_names(ctx)}
    for param in command.params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                names[name] = param
    return names


def _takes_value(param) -> bool:
    return param is not None and not param.is_flag and not param.count


def check_command(cli, args: tuple[str, ...]) -> list[str]:
    """Problems with `lmsae ARGS`: the command path must exist, and every --option must exist on the
    command (or group) it is given to. Values are not checked; `--help` ends the check."""
    import click

    problems: list[str] = []
    command, path = cli, ["lmsae"]
    ctx = click.Context(cli, info_name="lmsae", help_option_names=["-h", "--help"])
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            break
        if token.startswith("-") and token != "-":
            options = _option_names(command, ctx)
            name = token.split("=", 1)[0]
            if name not in options and not token.startswith("--") and token[:2] in options:
                name = token[:2]  # -n5
            if name not in options:
                choices = sorted(o for o in options if o.startswith("-"))
                hint = difflib.get_close_matches(name, choices, n=1)
                problems.append(f"`{' '.join(path)}` has no option {name}"
                                + (f" (did you mean {hint[0]}?)" if hint else "")
                                + f"; options: {', '.join(choices) or '(none)'}")
            elif name in command.get_help_option_names(ctx) or name == "--version":
                return problems
            elif "=" not in token and name == token and _takes_value(options[name]):
                i += 1
            i += 1
            continue
        if not isinstance(command, click.Group):
            i += 1  # an argument
            continue
        sub = command.get_command(ctx, token)
        if sub is None:
            choices = sorted(command.list_commands(ctx))
            hint = difflib.get_close_matches(token, choices, n=1)
            problems.append(f"`{' '.join(path)}` has no command {token!r}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else "")
                            + f"; commands: {', '.join(choices)}")
            return problems
        command, path = sub, [*path, token]
        ctx = click.Context(sub, info_name=token, parent=ctx)
        i += 1
    if isinstance(command, click.Group):
        problems.append(f"`{' '.join(path)}` is a group: name one of its commands "
                        f"({', '.join(sorted(command.list_commands(ctx)))})")
    return problems


COMMAND_LINES = [c for b in BLOCKS if b.lang in SHELL_LANGS for c in shell_commands(b)]


@_param(COMMAND_LINES)
def test_lmsae_command_exists(item, cli_tree):
    problems = check_command(cli_tree[0], item.args)
    assert not problems, f"{item.id}: {item.source}\n" + "\n".join(problems)


# --- ```python blocks and run blocks ---------------------------------------------------------------

PYTHON_BLOCKS = [b for b in BLOCKS if b.lang in PYTHON_LANGS]
RUN_BLOCKS = [b for b in BLOCKS if b.marker == "run"]


@_param(PYTHON_BLOCKS)
def test_python_block_compiles(item):
    try:
        compile(item.text, item.id, "exec")
    except SyntaxError as exc:
        problem = f"{item.path}:{item.file_line(exc.lineno or 0)}: {exc.msg}\n{exc.text or ''}"
    else:
        return
    pytest.fail(problem, pytrace=False)


def _repository_outputs() -> set[str]:
    """What a run block could have written into the repository: top-level entries and runs/*."""
    names = {p.name for p in ROOT.iterdir()}
    runs = ROOT / "runs"
    if runs.is_dir():
        names |= {f"runs/{p.name}" for p in runs.iterdir()}
    return names


def run_env(docs_tmp: pathlib.Path, path_first: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of a run block: offline, the venv's programs first on PATH, $DOCS_TMP for
    outputs and a throwaway store."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
        "DOCS_TMP": str(docs_tmp),
        "LMSAE_STORE_DIR": str(docs_tmp / "store"),
        "PATH": os.pathsep.join([*path_first, os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    }


def run_block(block: Block, tmp_path: pathlib.Path, timeout_s: float = RUN_TIMEOUT_S,
              warm: WarmInterpreter | None = None) -> str | None:
    """Execute ``block`` from the repository root (shell: `bash -euo pipefail`; python: the venv's
    interpreter) in the environment of :func:`run_env`; with ``warm``, its `lmsae` commands and
    the python block itself run in forks of the warm interpreter. Returns what went wrong, or None."""
    docs_tmp = tmp_path / "docs_tmp"
    docs_tmp.mkdir(parents=True)
    env = run_env(docs_tmp, (str(warm.bin_dir),) if warm else ())
    if block.lang in PYTHON_LANGS:
        script = tmp_path / "block.py"
        argv = [sys.executable, "-IS", str(warm.python_client), str(script)] if warm else [sys.executable, str(script)]
    else:
        script = tmp_path / "block.sh"
        argv = ["bash", "-euo", "pipefail", str(script)]
    script.write_text(block.text, encoding="utf-8")
    before = _repository_outputs()
    # a session of its own, so that a timeout kills the block's children too
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return f"{block.id}: run block still running after {timeout_s:g} s (keep run blocks cheap):\n{output[-3000:]}"
    written = _repository_outputs() - before
    if proc.returncode != 0:
        return f"{block.id}: run block exited with {proc.returncode}:\n{output[-4000:]}"
    if written:
        return f"{block.id}: run block wrote into the repository: {sorted(written)}; write to $DOCS_TMP"
    return None


# Starting `lmsae` or a python block costs 3-5 s of imports (torch, every plugin) on a busy 2-core
# machine, and the pages hold dozens of run blocks. A warm interpreter pays that once: it imports
# everything, then forks a child per `lmsae` command or python block. The child takes the caller's
# arguments, working directory, environment and stdin/stdout/stderr (passed over a Unix socket),
# runs `lmsae.cli.main` or the script, and sends back the exit code; it dies with its caller.
# What the interpreter reads only at start-up (PYTHONPATH, -X options) is the warm one's.
# LMSAE_DOCS_COLD=1 runs the real programs instead.

WARM_CLIENT = """#!{python} -IS
# `{mode}` for the docs tests: runs in a fork of the warm interpreter at {socket_path}
import json, os, socket, struct, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect({socket_path!r})
body = json.dumps({{"mode": {mode!r}, "prog": sys.argv[0], "args": sys.argv[1:], "cwd": os.getcwd(),
                   "env": dict(os.environ)}}).encode()
socket.send_fds(conn, [struct.pack("!Q", len(body))], [0, 1, 2])
conn.sendall(body)
reply = b""
while chunk := conn.recv(64):
    reply += chunk
if not reply.strip():
    print("{mode}: the warm interpreter's child died without an exit code", file=sys.stderr)
sys.exit(int(reply) if reply.strip() else 1)
"""


class WarmInterpreter:
    """The warm interpreter's process, `bin_dir/lmsae` and `python_client` (runs a script)."""

    def __init__(self, directory: pathlib.Path):
        directory.mkdir(parents=True, exist_ok=True)
        socket_path = str(directory / "warm.sock")
        self.bin_dir = directory / "bin"
        self.bin_dir.mkdir()
        self.python_client = directory / "python_client.py"
        for path, mode in ((self.bin_dir / "lmsae", "lmsae"), (self.python_client, "python")):
            path.write_text(WARM_CLIENT.format(python=sys.executable, mode=mode, socket_path=socket_path))
            path.chmod(0o755)
        code = (f"import sys; sys.path.append({str(pathlib.Path(__file__).parent)!r}); "
                f"import test_docs; test_docs.serve_warm({socket_path!r})")
        self.log = directory / "warm.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=run_env(directory),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                         start_new_session=True)
        ready = self.proc.stdout.readline()
        if ready.strip() != b"ready":
            self.close()
            raise RuntimeError(f"the warm interpreter did not start: {self.log.read_text()[-2000:]}")

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and any child still running
        self.proc.wait()
        self.proc.stdout.close()


def serve_warm(socket_path: str) -> None:
    """The warm interpreter: import everything once, then fork a child per request (never returns)."""
    import socket
    import struct

    import lmsae.cli  # noqa: F401 - torch, click and the core
    from lmsae.registry import load_registry

    load_registry()  # imports every installed plugin
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(16)
    server.settimeout(2.0)
    parent = os.getppid()
    print("ready", flush=True)
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent:  # pytest is gone without closing us
                os._exit(0)
            continue
        head, fds, _, _ = socket.recv_fds(conn, 8, 3)
        head += _receive(conn, 8 - len(head))
        body = _receive(conn, struct.unpack("!Q", head)[0]) if len(head) == 8 and len(fds) == 3 else b""
        if not body:  # the caller died while asking
            conn.close()
            for fd in fds:
                os.close(fd)
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            _warm_child(conn, fds, body)
        conn.close()
        for fd in fds:
            os.close(fd)


def _receive(conn, size: int) -> bytes:
    """``size`` bytes from ``conn``, or fewer when the other end closed it."""
    data = b""
    while len(data) < size and (chunk := conn.recv(size - len(data))):
        data += chunk
    return data


def _warm_child(conn, fds: list[int], body: bytes) -> None:
    import atexit
    import json
    import runpy
    import threading
    import traceback

    import lmsae.cli

    code = 1
    try:
        request = json.loads(body)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # the caller was killed (a timeout): stop too
        threading.Thread(target=lambda: (conn.recv(1), os._exit(137)), daemon=True).start()
        try:
            if request["mode"] == "lmsae":
                sys.argv = [request["prog"], *request["args"]]
                sys.path[0] = os.path.dirname(request["prog"])
                lmsae.cli.main(request["args"])
            else:
                script = os.path.abspath(request["args"][0])
                sys.argv = [script, *request["args"][1:]]
                sys.path[0] = os.path.dirname(script)
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what the interpreter would print and exit with
            traceback.print_exc()
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        conn.sendall(str(code).encode())
    finally:
        os._exit(code)


@pytest.fixture(scope="session")
def warm(tmp_path_factory):
    """A warm interpreter for the run blocks (None with LMSAE_DOCS_COLD=1 or when it cannot start)."""
    if os.environ.get("LMSAE_DOCS_COLD") or not RUN_BLOCKS:
        yield None
        return
    try:
        interpreter = WarmInterpreter(tmp_path_factory.mktemp("warm"))
    except (RuntimeError, OSError) as exc:
        import warnings

        warnings.warn(f"run blocks start real processes: {exc}", stacklevel=1)
        yield None
        return
    yield interpreter
    interpreter.close()


@_param(RUN_BLOCKS)
def test_run_block_succeeds(item, tmp_path, warm):
    problem = run_block(item, tmp_path, warm=warm)
    assert problem is None, problem


# --- links and anchors ------------------------------------------------------------------------------

INLINE_CODE_RE = re.compile(r"(`+)(.+?)\1")
LINK_RE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFDEF_RE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HREF_RE = re.compile(r"""<a\s[^>]*href=["']([^"']+)["']""", re.IGNORECASE)
HEADING_RE = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
EXPLICIT_ID_RE = re.compile(r"""<a\s[^>]*(?:id|name)=["']([^"']+)["']|\{:?\s*#([\w-]+)[^}]*\}""", re.IGNORECASE)


def _without_code(line: str) -> str:
    return INLINE_CODE_RE.sub(lambda m: " " * len(m[0]), line)


def links(page: Page) -> list[tuple[int, str]]:
    """(line, target) of every link outside code: [text](target), ![alt](target), [ref]: target, <a href>."""
    found = []
    for lineno, line in page.prose:
        text = re.sub(r"<!--.*?-->", "", _without_code(line))
        for regex in (LINK_RE, REFDEF_RE, HREF_RE):
            found += [(lineno, m[1]) for m in regex.finditer(text) if m[1]]
    return found


def _heading_text(raw: str) -> str:
    text = re.sub(r"\{:?\s*#[\w-]+[^}]*\}\s*$", "", raw)          # attr_list id
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)        # links -> their text
    text = re.sub(r"<[^>]+>", "", text)                           # HTML tags
    return text.replace("`", "").replace("*", "")


def github_slug(text: str) -> str:
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def mkdocs_slug(text: str) -> str:
    """Python-Markdown's toc slugify (MkDocs' default)."""
    value = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def anchors(page: Page) -> set[str]:
    """Heading ids as GitHub and MkDocs make them (duplicates numbered both ways), and explicit ids."""
    found: set[str] = set()
    seen: dict[tuple[str, str], int] = {}
    previous = ""
    for lineno, line in page.prose:
        heading = HEADING_RE.match(line)
        if heading:
            text = heading[2]
        elif previous.strip() and re.match(r"^ {0,3}(=+|-+)\s*$", line) and not HEADING_RE.match(previous):
            text = previous.strip()  # setext heading
        else:
            text = None
        if text is not None:
            for style, slug, sep in (("gh", github_slug(_heading_text(text)), "-"),
                                     ("md", mkdocs_slug(_heading_text(text)), "_")):
                n = seen.get((style, slug), 0)
                found.add(slug if n == 0 else f"{slug}{sep}{n}")
                seen[(style, slug)] = n + 1
        for m in EXPLICIT_ID_RE.finditer(line):
            found.add(m[1] or m[2])
        previous = line
    return found


def check_links(page: Page, pages: dict[str, Page], root: pathlib.Path = ROOT) -> list[str]:
    problems = []
    base = (root / page.path).parent
    for lineno, target in links(page):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto: ...
        path_part, _, anchor = target.partition("#")
        path_part = path_part.split("?", 1)[0]
        resolved = (base / path_part).resolve() if path_part else (root / page.path).resolve()
        if path_part.startswith("/"):
            problems.append(f"{page.path}:{lineno}: {target}: use a relative link")
            continue
        if not resolved.exists():
            shown = resolved.relative_to(root.resolve()) if resolved.is_relative_to(root.resolve()) else resolved
            problems.append(f"{page.path}:{lineno}: {target}: no such file ({shown})")
            continue
        if anchor and resolved.suffix == ".md":
            try:
                key = resolved.relative_to(root.resolve()).as_posix()
            except ValueError:
                continue
            target_page = pages.get(key)
            if target_page is not None and anchor not in anchors(target_page):
                problems.append(f"{page.path}:{lineno}: {target}: {key} has no heading with the anchor #{anchor}")
    return problems


@_param(list(PAGES), id_of=str)
def test_relative_links_resolve(item):
    problems = check_links(PAGES[item], PAGES)
    assert not problems, "\n".join(problems)


# --- coverage: every hook, component, command and page is documented ----------------------------------


def _code_text(page: Page) -> str:
    """The code of a page: its fenced blocks and inline code spans."""
    spans = [m[2] for _, line in page.prose for m in INLINE_CODE_RE.finditer(line)]
    return "\n".join([b.text for b in page.blocks] + spans)


def mentions(name: str, page_paths, pages: dict[str, Page] | None = None) -> bool:
    """Whether one of the pages names ``name`` as code: an inline `name` span, or "name" quoted in
    code (`task = "train"`, `type = "text"`), so that a common word in prose does not count."""
    quoted = re.compile(rf"""(["']){re.escape(name)}\1""")
    for path in page_paths:
        page = (PAGES if pages is None else pages).get(path)
        if page is None:
            continue
        spans = [m[2].strip() for _, line in page.prose for m in INLINE_CODE_RE.finditer(line)]
        if name in spans or quoted.search(_code_text(page)):
            return True
    return False


def _hooks() -> list[str]:
    from lmsae import hookspecs

    return sorted(n for n in dir(hookspecs) if n.startswith("lmsae_") and hasattr(getattr(hookspecs, n), "lmsae_spec"))




@pytest.fixture(scope="session")
def shipped(registry):
    """The registry restricted to the distributions this repository ships."""
    return registry.restricted(set(DISTRIBUTIONS))


@pytest.mark.parametrize("hook", _hooks())
def test_every_hook_is_documented_in_plugins_page(hook):
    page = DOCS / "plugins.md"
    assert page.exists(), "docs/plugins.md is missing"
    assert hook in page.read_text(encoding="utf-8"), f"docs/plugins.md does not mention the hook {hook}"


WORKFLOW_PAGES = [p for p in DOC_PAGES if p.startswith("docs/workflows/")]
ARCHITECTURE_PAGES = [p for p in DOC_PAGES if p.startswith("docs/architectures/")]
NON_REFERENCE_PAGES = [p for p in DOC_PAGES if p != "docs/reference.md"]


def test_coverage_of_tasks_architectures_and_components(shipped):
    """Each task is used on a workflow page (a plugin's task may be on its architecture page), each
    architecture has docs/architectures/NAME.md, and every other component is named in the docs."""
    problems = []
    for entry in shipped.entries():
        label = f"{entry.kind} {entry.name!r} ({entry.distribution})"
        if entry.kind == "task":
            if not mentions(entry.name, WORKFLOW_PAGES + ARCHITECTURE_PAGES):
                problems.append(f"{label}: not used on any docs/workflows/*.md (or docs/architectures/*.md) page")
        elif entry.kind == "architecture":
            page = f"docs/architectures/{entry.name}.md"
            if page not in PAGES:
                problems.append(f"{label}: {page} is missing")
            elif not mentions(entry.name, [page]):
                problems.append(f"{label}: {page} never names it in code (e.g. `architecture = \"{entry.name}\"`)")
        elif not mentions(entry.name, DOC_PAGES):
            problems.append(f"{label}: not named in any docs page")
    assert not problems, "\n".join(problems)


def _command_paths(cli_tree) -> list[tuple[str, str]]:
    """(`lmsae a b`, distribution) of every command (not group) of the shipped distributions."""
    import click

    cli, owners = cli_tree
    out = []

    def walk(command, path, dist):
        if isinstance(command, click.Group):
            for name in sorted(command.commands):
                walk(command.commands[name], [*path, name], dist or owners.get(name))
        else:
            out.append((" ".join(path), dist))

    walk(cli, ["lmsae"], None)
    return [(p, d) for p, d in out if d in DISTRIBUTIONS]


def test_every_command_is_documented(cli_tree):
    """Every command of the shipped distributions appears as `lmsae ...` in a page other than the reference."""
    text = "\n".join(_code_text(PAGES[p]) for p in NON_REFERENCE_PAGES)
    missing = [f"{path} ({dist})" for path, dist in _command_paths(cli_tree)
               if not re.search(rf"(?<![\w-]){re.escape(path)}(?![\w-])", text)]
    assert not missing, "commands no docs page shows: " + ", ".join(missing)


def _nav_pages(nav) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_pages(value)


def _mkdocs_nav() -> list[str]:
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    return ["docs/" + p for p in _nav_pages(config.get("nav", [])) if not re.match(r"^[a-z]+://", p)]


def test_mkdocs_nav_lists_existing_pages_once():
    nav = _mkdocs_nav()
    missing = [p for p in nav if not (ROOT / p).exists()]
    twice = sorted({p for p in nav if nav.count(p) > 1})
    assert not missing, f"mkdocs.yml's nav lists pages that do not exist: {missing}"
    assert not twice, f"mkdocs.yml's nav lists pages twice: {twice}"


@_param(DOC_PAGES, id_of=str)
def test_page_is_in_nav_and_index(item):
    assert item in _mkdocs_nav(), f"{item} is not in mkdocs.yml's nav"
    if item != "docs/index.md":
        index = PAGES.get("docs/index.md")
        assert index is not None, "docs/index.md is missing"
        targets = {(DOCS / t.partition("#")[0]).resolve() for _, t in links(index) if t.partition("#")[0]}
        assert (ROOT / item).resolve() in targets, f"docs/index.md does not link to {item}"


# --- the Markdown reader itself ------------------------------------------------------------------------


def _parse(tmp_path: pathlib.Path, text: str, name: str = "docs/page.md") -> Page:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return parse_markdown(path.read_text(encoding="utf-8"), name)


def test_reader_finds_blocks_with_their_lines_and_markers(tmp_path):
    page = _parse(tmp_path, "# Title\n\n```toml\ntask = \"train\"\n```\n\n<!-- docs-test: fragment -->\n"
                            "```toml\n[x]\n```\n\n<!-- docs-test: run -->\n\n```bash title=\"x\"\nlmsae plugins\n```\n"
                            "~~~python\nprint(1)\n~~~\n")
    assert [(b.line, b.lang, b.marker, b.text) for b in page.blocks] == [
        (3, "toml", None, 'task = "train"\n'), (8, "toml", "fragment", "[x]\n"),
        (14, "bash", "run", "lmsae plugins\n"), (17, "python", None, "print(1)\n")]
    assert page.blocks[0].id == "docs/page.md:3" and page.blocks[2].file_line(1) == 15
    assert not page.problems


def test_reader_keeps_nested_fences_inside_the_outer_block(tmp_path):
    page = _parse(tmp_path, "````markdown\n<!-- docs-test: run -->\n```toml\nbad = \n```\n````\n\n"
                            "  ```sh\n  lmsae run x.toml\n  ```\n")
    assert [(b.line, b.lang) for b in page.blocks] == [(1, "markdown"), (8, "sh")]
    assert "```toml" in page.blocks[0].text and page.blocks[1].text == "lmsae run x.toml\n"
    assert not page.problems  # the marker inside the outer block is content, not a marker
    assert all(n not in (2, 3, 4) for n, _ in page.prose)


def test_reader_reports_misplaced_unknown_and_dangling_markers(tmp_path):
    page = _parse(tmp_path, "<!-- docs-test: fragment -->\n```bash\nls\n```\n<!-- docs-test: frag -->\n```toml\n```\n"
                            "<!-- docs-test: run -->\nsome text\n```bash\nls\n```\n<!-- docs-test: run -->\n")
    assert [b.marker for b in page.blocks] == [None, None, None]
    assert len(page.problems) == 4, page.problems
    assert page.problems[0].startswith("docs/page.md:1: `docs-test: fragment` may only precede toml")
    assert "docs/page.md:5: unknown marker" in page.problems[1]
    assert "docs/page.md:8:" in page.problems[2] and "line 9" in page.problems[2]
    assert page.problems[3].startswith("docs/page.md:13:")
    unclosed = _parse(tmp_path, "```toml\na = 1\n")
    assert unclosed.problems == ["docs/page.md:1: the ``` fence is never closed"]


def test_reader_finds_lmsae_invocations(tmp_path):
    page = _parse(tmp_path, "```bash\nlmsae config check examples/a.toml   # check\n$ lmsae plugins\n"
                            ".venv/bin/lmsae run x.toml --set 'a.b=\"c d\"' \\\n    --set e=1 && lmsae plugins | head\n"
                            "LMSAE_STORE_DIR=/tmp/s nice -n 19 lmsae show feature quickstart 3 > out.txt\n"
                            "torchrun --standalone --nproc-per-node 2 -m lmsae run c.toml\n"
                            "cat > x.toml <<EOF\nlmsae not-a-command\nEOF\npip install lmsae\necho lmsae run\n```\n"
                            "```console\n$ lmsae plugins\nlmsae: error: nothing\nname  kind\n```\n")
    found = [(c.line, c.args) for b in page.blocks for c in shell_commands(b)]
    assert found == [
        (2, ("config", "check", "examples/a.toml")), (3, ("plugins",)),
        (4, ("run", "x.toml", "--set", 'a.b="c d"', "--set", "e=1")), (4, ("plugins",)),
        (6, ("show", "feature", "quickstart", "3")), (7, ("run", "c.toml")), (15, ("plugins",))]


def test_command_check_resolves_paths_and_options(cli_tree):
    cli = cli_tree[0]
    assert check_command(cli, ("config", "check", "x.toml", "--set", "a=1")) == []
    assert check_command(cli, ("--debug", "run", "x.toml", "--set=a=1")) == []
    assert check_command(cli, ("show", "feature", "-h")) == []
    assert check_command(cli, ("--version",)) == []
    assert "has no command 'chek' (did you mean 'check'?)" in check_command(cli, ("config", "chek", "x"))[0]
    assert "has no option --sett (did you mean --set?)" in check_command(cli, ("run", "x.toml", "--sett", "a=1"))[0]
    assert "is a group" in check_command(cli, ("config",))[0]
    assert check_command(cli, ("run", "x.toml", "--set", "--looks-like-an-option")) == []  # a value


def test_links_and_anchors(tmp_path):
    pages = {
        "docs/a.md": _parse(tmp_path, "# Top\n\n## Tasks (`task = ...`)\n\n## Tasks (`task = ...`)\n\nSetext\n---\n"
                                      "<a id=\"custom\"></a>\n", "docs/a.md"),
        "docs/sub/b.md": _parse(tmp_path, "[ok](../a.md#tasks-task--) [md](../a.md#tasks-task_1) "
                                          "[gh](../a.md#tasks-task---1)\n"
                                          "[s](../a.md#setext) [c](../a.md#custom) [self](#here) `[no](nowhere.md)`\n"
                                          "[web](https://example.org/x.md) [bad](../a.md#nope) [gone](c.md)\n"
                                          "```md\n[in code](gone.md)\n```\n\n## Here\n", "docs/sub/b.md"),
    }
    assert check_links(pages["docs/a.md"], pages, tmp_path) == []
    problems = check_links(pages["docs/sub/b.md"], pages, tmp_path)
    assert len(problems) == 2, problems
    assert problems[0].startswith("docs/sub/b.md:3: ../a.md#nope: docs/a.md has no heading")
    assert problems[1].startswith("docs/sub/b.md:3: c.md: no such file")


@pytest.mark.parametrize("how", ["cold", "warm"])
def test_run_block_environment_and_failures(how, tmp_path, monkeypatch, request):
    """Both ways of running a block give it the same environment and report failures the same way
    (`lmsae` itself only warm: a cold start costs seconds, and the run blocks of the pages use it)."""
    warm = request.getfixturevalue("warm") if how == "warm" else None
    if how == "warm" and warm is None:
        pytest.skip("no warm interpreter (LMSAE_DOCS_COLD=1, or no run blocks)")
    lmsae = warm.bin_dir / "lmsae" if warm else pathlib.Path(sys.executable).parent / "lmsae"
    monkeypatch.setenv("ROOT_DIR", str(ROOT))
    monkeypatch.setenv("LMSAE", str(lmsae))
    monkeypatch.setenv("VENV_PYTHON", sys.executable)
    script = ('[ "$PWD" = "$ROOT_DIR" ] && [ "$HF_HUB_OFFLINE" = 1 ] && [ "$WANDB_MODE" = offline ] && [ -d "$DOCS_TMP" ]\n'
              '[ "$(command -v python)" = "$VENV_PYTHON" ] && [ "$(command -v lmsae)" = "$LMSAE" ]\n')
    if warm:
        script += ('cd "$DOCS_TMP"\nout=$(echo "[x]" | lmsae config check /dev/stdin 2>&1 || echo "exit $?")\n'
                   '[[ $out == *"unsupported config file type"*"exit 2" ]]\n'
                   'lmsae config example sae > sae.toml && lmsae --debug config check sae.toml | grep "valid .train. config"\n')
        failing = Block("docs/page.md", 11, "bash", "lmsae config check no-such-file.toml | cat\n")
        problem = run_block(failing, tmp_path / "failing", warm=warm)
        assert "exited with 2" in problem and "no-such-file.toml" in problem and "file not found" in problem
    assert run_block(Block("docs/page.md", 7, "bash", script), tmp_path / "ok", warm=warm) is None
    unset = Block("docs/page.md", 9, "bash", 'echo "partial output"\necho "$NOT_SET_ANYWHERE"\n')
    problem = run_block(unset, tmp_path / "unset", warm=warm)
    assert problem.startswith("docs/page.md:9: run block exited with 1:") and "partial output" in problem
    python = Block("docs/page.md", 13, "python", "import os, sys\nassert os.environ['DOCS_TMP']\n"
                   "assert os.getcwd() == os.environ['ROOT_DIR'] and sys.argv[0].endswith('block.py')\n"
                   "print('from python')\nsys.exit(3)\n")
    problem = run_block(python, tmp_path / "python", warm=warm)
    assert problem.startswith("docs/page.md:13: run block exited with 3") and "from python" in problem
    raising = Block("docs/page.md", 15, "python", "raise ValueError('boom')\n")
    assert "ValueError: boom" in run_block(raising, tmp_path / "raising", warm=warm)
    slow = Block("docs/page.md", 17, "bash", "echo started\nsleep 60 | cat\n")
    problem = run_block(slow, tmp_path / "slow", timeout_s=0.5, warm=warm)
    assert "docs/page.md:17: run block still running after 0.5 s" in problem and "started" in problem
    pid_file = tmp_path / "pid"
    stuck = Block("docs/page.md", 19, "python", f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                  "time.sleep(60)\n")
    assert "still running after 2 s" in run_block(stuck, tmp_path / "stuck", timeout_s=2, warm=warm)
    proc = pathlib.Path(f"/proc/{pid_file.read_text()}")
    for _ in range(50):  # the python process (a warm child) goes with the block
        if not proc.exists() or "Z" in (proc / "stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"{proc} is still running after its block was killed")


def test_mentions_count_code_not_prose(tmp_path):
    pages = {"docs/a.md": _parse(tmp_path, "We train here, init is a word.\n\n```toml\ninit = \"identical\"\n"
                                           "type = 'text'\n```\nThe `sweep` task; `lmsae run x.toml`.\n", "docs/a.md")}
    assert [n for n in ("train", "init", "identical", "text", "sweep", "run", "x.toml")
            if mentions(n, ["docs/a.md"], pages)] == ["identical", "text", "sweep"]
