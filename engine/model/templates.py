"""Sandbox templates: YAML files in ``templates/``, loaded strictly against the schema of
engine/model/schema.py.

Unknown keys are errors, units are checked, and every problem names the file, the field path
and the line, all of them at once. YAML is parsed with the safe loader; anchors and aliases are
refused (no "billion laughs"), and so is nesting over 20 levels deep. A file over 64 KiB is
refused before parsing, and so is anything in the folder that is not a regular file inside it
(a symlink out of the folder, a FIFO).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from engine.errors import NotFoundError, TemplateError
from engine.model.schema import (
    NAME,
    TASKS_FOLDER,
    Archive,
    Claude,
    Expose,
    Network,
    Recording,
    Resources,
    Submit,
    Task,
    TemplateFile,
    Workspace,
    fields_of,
    model_at,
)

__all__ = [
    "MAX_FILE_BYTES",
    "TASKS_FOLDER",
    "Archive",
    "Claude",
    "Expose",
    "Network",
    "Recording",
    "Resources",
    "Submit",
    "Task",
    "Template",
    "Workspace",
    "find",
    "load",
    "load_all",
]

MAX_FILE_BYTES = 64 * 1024
MAX_DEPTH = 20  # nesting of mappings and lists; a template needs 3


class Template(TemplateFile):
    """A loaded template: the file's fields, and what the loader knows of the file."""

    source: str = ""  # the file it came from
    # SHA-256 of the file's bytes: pooled sandboxes made from an older version are not claimed.
    digest: str = ""
    # Fields of an older format, still read, each with the field that replaces it.
    warnings: tuple[str, ...] = ()

    @property
    def cpu_limit(self) -> float:  # cores
        return self.resources.cpu_limit

    @property
    def memory_limit(self) -> int:  # bytes
        return self.resources.memory_limit

    @property
    def pids_limit(self) -> int:
        return self.resources.pids_limit

    @property
    def egress(self) -> str:  # open | none | allow
        return self.network.egress

    @property
    def disk_limit(self) -> int | None:  # bytes; None: SANDBOX_DISK_LIMIT
        return self.resources.disk_limit


class _Lines:
    """The line (1-based) of every field path in a YAML document, from its node tree."""

    def __init__(self, root: yaml.Node) -> None:
        self.lines: dict[str, int] = {}
        self._walk(root, "")

    def _walk(self, node: yaml.Node, path: str) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = str(key_node.value)
                self._walk(value_node, f"{path}.{key}" if path else key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, f"{path}[{i}]")

    def path(self, loc: tuple[str | int, ...]) -> str:
        """A model error's location as this file's field path (``expose[0].container``)."""
        path = ""
        for part in loc:
            index = f"{path}[{part}]"
            if isinstance(part, int) and index in self.lines:
                path = index
            else:
                path = f"{path}.{part}" if path else str(part)
        return path

    def line(self, path: str) -> int | None:
        """The line of the path, or of its nearest parent present in the file."""
        while path not in self.lines:
            if not path:
                return None
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return self.lines[path]


def _parse(text: str, file: str) -> tuple[Any, _Lines]:
    try:
        # The event stream is checked first, one event at a time: nothing is built from it yet.
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = event.start_mark.line + 1 if event.start_mark else None
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise TemplateError(file, [("", line, "YAML anchors and aliases are not allowed")])
            depth += isinstance(event, yaml.CollectionStartEvent)
            depth -= isinstance(event, yaml.CollectionEndEvent)
            # PyYAML composes recursively, and scans deep flow nesting in quadratic time:
            # 64 KiB of "[[[[" would take minutes, then exhaust the stack.
            if depth > MAX_DEPTH:
                raise TemplateError(file, [("", line, f"nested over {MAX_DEPTH} levels deep")])
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a control character: a position, no mark
        line = text.count("\n", 0, exc.position) + 1
        problem = f"not valid YAML: the character {exc.character!r} is not allowed"
        raise TemplateError(file, [("", line, problem)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise TemplateError(
            file, [("", line, f"not valid YAML: {getattr(exc, 'problem', exc)}")]
        ) from None
    if node is None:
        raise TemplateError(file, [("", 1, "the file is empty")])
    return data, _Lines(node)


# Loaded templates by file, with the (mtime, size) they were read at: the API lists and reads
# templates on every request, and parsing with line tracking costs milliseconds a file.
_CACHE: dict[str, tuple[tuple[int, int], Template]] = {}
_CACHE_LOCK = threading.Lock()


def load(path: Path) -> Template:
    """Load and validate one template file; raise TemplateError listing every problem. A file
    unchanged since its last load (same mtime and size) is not read again."""
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is not None:
        key = (stat.st_mtime_ns, stat.st_size)
        with _CACHE_LOCK:
            cached = _CACHE.get(str(path))
        if cached and cached[0] == key:
            return cached[1]
    template = _load(path)
    if stat is not None:
        with _CACHE_LOCK:
            _CACHE[str(path)] = ((stat.st_mtime_ns, stat.st_size), template)
    return template


def _load(path: Path) -> Template:
    file = str(path)
    if not path.is_file():
        raise TemplateError(file, [("", None, "not a regular file")])
    # Read one byte past the limit, never the whole of a huge file.
    with path.open("rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise TemplateError(file, [("", None, f"file is over the limit of {MAX_FILE_BYTES} bytes")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TemplateError(file, [("", None, "file is not UTF-8 text")]) from None
    raw, lines = _parse(text, file)
    return validate(raw, lines, file, hashlib.sha256(data).hexdigest())


def validate(raw: Any, lines: _Lines, file: str, digest: str = "") -> Template:
    """The document checked against the schema; every problem raised at once."""
    if not isinstance(raw, dict):
        raise TemplateError(file, [("", 1, "a template is a mapping of fields")])
    problems: list[tuple[str, int | None, str]] = []
    if "claude_auth" in raw and "claude" in raw:
        problems.append(("claude_auth", lines.line("claude_auth"),
                         "is replaced by claude.access: keep only the claude section"))  # fmt: skip
    try:
        found = TemplateFile.model_validate(raw, context={"file": file})
    except ValidationError as exc:
        problems += [_problem(error, lines) for error in exc.errors()]
    if problems:
        raise TemplateError(file, problems)
    fields = {name: getattr(found, name) for name in fields_of(TemplateFile)}
    warnings: list[str] = []
    if found.claude_auth is not None:
        # The older ``claude_auth: true|false`` reads as ``access: gateway`` or ``none``.
        access = "gateway" if found.claude_auth else "none"
        fields["claude"] = Claude(access=access)
        warnings.append(
            f"{file}:{lines.line('claude_auth')}: claude_auth is deprecated: write"
            f" 'claude: {{access: {access}}}' (credentials no longer enter a sandbox:"
            " docs/claude.md)"
        )
    return Template.model_construct(**fields, source=file, digest=digest, warnings=tuple(warnings))


def _problem(error: ErrorDetails, lines: _Lines) -> tuple[str, int | None, str]:
    """One model error as (field path, line, message), in the words of the template's checks."""
    loc = tuple(part for part in error["loc"] if part != "[key]")
    path = lines.path(loc)
    kind, message = error["type"], error["msg"]
    if kind == "template" and error.get("ctx", {}).get("at"):
        path = error["ctx"]["at"]
    elif kind == "missing":
        message = "is required"
    elif kind in ("extra_forbidden", "unexpected_keyword_argument"):
        inside = model_at(loc[:-1])
        known = list(fields_of(inside))
        names = sorted(known) if inside is TemplateFile else known
        message = f"unknown field (known: {', '.join(names)})"
    elif kind != "template":
        message = message[0].lower() + message[1:]
    return path, lines.line(path), message


def _inside(folder: Path, path: Path) -> Path:
    """The path, if it resolves inside the folder (a symlink may point elsewhere): templates
    come from the operator's folder only."""
    if folder.resolve() not in path.resolve().parents:
        raise TemplateError(str(path), [("", None, "points outside the templates folder")])
    return path


def load_all(folder: Path) -> dict[str, Template]:
    """Every ``*.yaml`` template in the folder, by name; the first invalid one raises."""
    paths = sorted(folder.glob("*.yaml"))
    return {t.name: t for t in (load(_inside(folder, p)) for p in paths)}


def find(folder: Path, name: str) -> Template:
    # The whole name matches (no trailing newline): no "../", "/", NUL or dot gets through.
    if not NAME.fullmatch(name):
        raise NotFoundError(f"no template named {name!r}")
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise NotFoundError(f"no template named {name!r}")
    return load(_inside(folder, path))
