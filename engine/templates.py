"""Sandbox templates: YAML files in ``templates/``, loaded strictly.

Unknown keys are errors, units are checked, and every problem names the file, the field path
and the line. YAML is parsed with the safe loader; anchors and aliases are refused (no
"billion laughs"), and so is nesting over 20 levels deep. A file over 64 KiB is refused before
parsing, and so is anything in the folder that is not a regular file inside it (a symlink out
of the folder, a FIFO).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from engine.errors import NotFoundError, TemplateError
from engine.units import parse_cpus, parse_duration, parse_memory

MAX_FILE_BYTES = 64 * 1024
MAX_DEPTH = 20  # nesting of mappings and lists; a template needs 3
NAME = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SERVICES = ("postgres", "redis")


@dataclass(frozen=True)
class Expose:
    container: int  # the workspace port
    public: bool = False  # routed by Traefik at <sandbox>-<port>.<domain>


@dataclass(frozen=True)
class Workspace:
    user: str = "coder"
    workdir: str = "/home/coder/workspace"
    shell: str = "/bin/bash"


@dataclass(frozen=True)
class Task:
    """What a candidate starts from: ``templates/tasks/<folder>`` copied into the workspace's
    workdir (owned by the workspace user), optionally made a git repository with a first
    commit, then ``init`` commands run as the workspace user (their output in the events)."""

    folder: str
    git: bool = True
    init: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recording:
    """Terminal sessions recorded as asciicast v2: output always (when enabled), keystrokes
    only with ``input``; ``notice`` tells the candidate the session is recorded."""

    enabled: bool = True
    input: bool = False
    notice: bool = True


@dataclass(frozen=True)
class Archive:
    """What is archived before the sandbox is destroyed (expiry, delete or submit), and for
    how long it is kept (None: the engine's ``archive_retention``)."""

    paths: tuple[str, ...] = ("/home/coder",)
    retention: timedelta | None = None


@dataclass(frozen=True)
class Submit:
    """What a candidate's submit does after archiving: ``destroy`` the sandbox too."""

    destroy: bool = False


CLAUDE_ACCESS = ("gateway", "none", "operator-login")
MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,99}$")
MAX_CLAUDE_SETTINGS = 16 * 1024  # bytes of the template's managed settings, as JSON
MAX_BUDGET = 10**10


@dataclass(frozen=True)
class Claude:
    """How Claude Code in the sandbox reaches the model (docs/claude.md). ``gateway``: through
    the engine's AI gateway with a token good for this sandbox alone, within ``budget_tokens``
    (engine/ai/budget.py), ``max_tokens`` a request, the pinned ``model`` if one is set;
    ``none``: no access is configured; ``operator-login``: a copy of the operator's own
    Claude Code login in the sandbox (it exposes it to whoever has the shell: never for
    candidates). ``settings`` become root-owned managed settings the candidate cannot change."""

    access: str = "gateway"
    model: str | None = None
    budget_tokens: int = 2_000_000
    max_tokens: int = 32_000
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Template:
    name: str
    base_image: str
    ttl: timedelta
    max_ttl: timedelta
    cpu_limit: float  # cores
    memory_limit: int  # bytes
    pids_limit: int
    services: tuple[str, ...] = ()
    expose: tuple[Expose, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    workspace: Workspace = Workspace()
    claude: Claude = Claude()
    description: str = ""
    source: str = ""  # the file it came from
    # Sandboxes kept created ahead (the warm pool): a create claims one in milliseconds.
    pool: int = 0
    # SHA-256 of the file's bytes: pooled sandboxes made from an older version are not claimed.
    digest: str = ""
    task: Task | None = None
    recording: Recording = Recording()
    archive: Archive = Archive()
    submit: Submit = Submit()
    # Fields of an older format, still read, each with the field that replaces it.
    warnings: tuple[str, ...] = ()


DEFAULT_PIDS_LIMIT = 1024
MAX_POOL = 50
TASKS_FOLDER = "tasks"  # beside the templates: templates/tasks/<folder>
MAX_INIT = 20  # init commands of a task
MAX_ARCHIVE_PATHS = 10


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
    return dataclasses.replace(validate(raw, lines, file), digest=hashlib.sha256(data).hexdigest())


def validate(raw: Any, lines: _Lines, file: str) -> Template:
    problems: list[tuple[str, int | None, str]] = []

    def fail(path: str, message: str) -> None:
        problems.append((path, lines.line(path), message))

    if not isinstance(raw, dict):
        raise TemplateError(file, [("", 1, "a template is a mapping of fields")])
    known = {
        "name",
        "description",
        "base_image",
        "services",
        "resources",
        "ttl",
        "max_ttl",
        "expose",
        "env",
        "workspace",
        "claude",
        "claude_auth",
        "pool",
        "task",
        "recording",
        "archive",
        "submit",
    }
    for key in raw:
        if key not in known:
            fail(key, f"unknown field (known: {', '.join(sorted(known))})")

    def text(path: str, value: Any, *, required: bool = False) -> str:
        if value is None:
            if required:
                fail(path, "is required")
            return ""
        if not isinstance(value, str) or not value.strip():
            fail(path, "must be a non-empty string")
            return ""
        return value

    name = text("name", raw.get("name"), required=True)
    if name and not NAME.match(name):
        fail("name", "must be 2-40 lowercase letters, digits and dashes, starting with a letter")
    stem = Path(file).stem
    if name and NAME.match(name) and stem != name:
        fail("name", f"must match the file name ({stem!r})")
    base_image = text("base_image", raw.get("base_image"), required=True)

    def duration(path: str, value: Any) -> timedelta | None:
        if value is None:
            return None
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            fail(path, str(exc))
            return None

    ttl = duration("ttl", raw.get("ttl"))
    if raw.get("ttl") is None:
        fail("ttl", "is required")
    max_ttl = duration("max_ttl", raw.get("max_ttl")) or ttl
    if ttl and max_ttl and ttl > max_ttl:
        fail("ttl", f"is longer than max_ttl ({raw.get('max_ttl')})")

    services: list[str] = []
    raw_services = raw.get("services") or []
    if not isinstance(raw_services, list):
        fail("services", "must be a list of service names")
        raw_services = []
    for i, svc in enumerate(raw_services):
        if svc not in SERVICES:
            fail(f"services[{i}]", f"unknown service {svc!r} (known: {', '.join(SERVICES)})")
        elif svc in services:
            fail(f"services[{i}]", f"{svc!r} is listed twice")
        else:
            services.append(svc)

    cpu_limit, memory_limit, pids_limit = 1.0, 2 * 2**30, DEFAULT_PIDS_LIMIT
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict):
        fail("resources", "must be a mapping")
        resources = {}
    for key in resources:
        if key not in ("cpu_limit", "memory_limit", "pids_limit"):
            fail(f"resources.{key}", "unknown field (known: cpu_limit, memory_limit, pids_limit)")
    if "cpu_limit" in resources:
        try:
            cpu_limit = parse_cpus(str(resources["cpu_limit"]))
        except ValueError as exc:
            fail("resources.cpu_limit", str(exc))
    if "memory_limit" in resources:
        try:
            memory_limit = parse_memory(str(resources["memory_limit"]))
            if memory_limit < 64 * 2**20:
                fail("resources.memory_limit", "must be at least 64Mi")
        except ValueError as exc:
            fail("resources.memory_limit", str(exc))
    if "pids_limit" in resources:
        pids = resources["pids_limit"]
        if not isinstance(pids, int) or isinstance(pids, bool) or not 16 <= pids <= 65536:
            fail("resources.pids_limit", "must be a whole number of processes from 16 to 65536")
        else:
            pids_limit = pids

    exposes: list[Expose] = []
    raw_expose = raw.get("expose") or []
    if not isinstance(raw_expose, list):
        fail("expose", "must be a list")
        raw_expose = []
    for i, item in enumerate(raw_expose):
        path = f"expose[{i}]"
        if not isinstance(item, dict):
            fail(path, "must be a mapping with container and public")
            continue
        for key in item:
            if key not in ("container", "public"):
                fail(f"{path}.{key}", "unknown field (known: container, public)")
        port, public = item.get("container"), item.get("public", False)
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            fail(f"{path}.container", "must be a port number from 1 to 65535")
            continue
        if not isinstance(public, bool):
            fail(f"{path}.public", "must be true or false")
            continue
        if any(e.container == port for e in exposes):
            fail(f"{path}.container", f"port {port} is exposed twice")
            continue
        exposes.append(Expose(port, public))

    env: dict[str, str] = {}
    raw_env = raw.get("env") or {}
    if not isinstance(raw_env, dict):
        fail("env", "must be a mapping of NAME: value")
        raw_env = {}
    for key, value in raw_env.items():
        if not ENV_KEY.match(str(key)):
            fail(f"env.{key}", "is not a valid variable name")
        elif not isinstance(value, str | int | float | bool):
            fail(f"env.{key}", "must be a string")
        else:
            env[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)

    workspace = Workspace()
    raw_ws = raw.get("workspace") or {}
    if not isinstance(raw_ws, dict):
        fail("workspace", "must be a mapping")
        raw_ws = {}
    for key in raw_ws:
        if key not in ("user", "workdir", "shell"):
            fail(f"workspace.{key}", "unknown field (known: user, workdir, shell)")
    ws_values = {
        k: text(f"workspace.{k}", raw_ws.get(k))
        for k in ("user", "workdir", "shell")
        if k in raw_ws
    }
    for key in ("workdir", "shell"):
        if ws_values.get(key) and not ws_values[key].startswith("/"):
            fail(f"workspace.{key}", "must be an absolute path")
    if ws_values:
        workspace = Workspace(**{k: v for k, v in ws_values.items() if v})

    pool = raw.get("pool", 0)
    if not isinstance(pool, int) or isinstance(pool, bool) or not 0 <= pool <= MAX_POOL:
        fail("pool", f"must be a whole number from 0 to {MAX_POOL}")
        pool = 0
    description = raw.get("description") or ""
    if not isinstance(description, str):
        fail("description", "must be a string")
        description = ""

    def section(path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        value = raw.get(path)
        if value is None:
            return {}
        if not isinstance(value, dict):
            fail(path, f"must be a mapping ({', '.join(allowed)})")
            return {}
        for key in value:
            if key not in allowed:
                fail(f"{path}.{key}", f"unknown field (known: {', '.join(allowed)})")
        return value

    def flag(path: str, value: Any, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            fail(path, "must be true or false")
            return default
        return value

    task: Task | None = None
    raw_task = section("task", ("folder", "git", "init"))
    if raw_task:
        folder = raw_task.get("folder")
        if not isinstance(folder, str) or not NAME.fullmatch(folder):
            fail(
                "task.folder", "must name a folder of templates/tasks/ (lowercase, digits, dashes)"
            )
            folder = ""
        else:
            where = Path(file).parent / TASKS_FOLDER / folder
            tasks = (Path(file).parent / TASKS_FOLDER).resolve()
            if not where.is_dir() or tasks not in where.resolve().parents:
                fail("task.folder", f"{TASKS_FOLDER}/{folder} is not a folder beside the template")
        init = raw_task.get("init") or []
        if not isinstance(init, list) or len(init) > MAX_INIT:
            fail("task.init", f"must be a list of at most {MAX_INIT} commands")
            init = []
        for i, command in enumerate(init):
            if not isinstance(command, str) or not command.strip() or len(command) > 4096:
                fail(
                    f"task.init[{i}]", "must be a shell command (a non-empty string, 4 KiB at most)"
                )
        task = Task(
            folder=folder,
            git=flag("task.git", raw_task.get("git"), True),
            init=tuple(c for c in init if isinstance(c, str)),
        )
    raw_rec = section("recording", ("enabled", "input", "notice"))
    recording = Recording(
        enabled=flag("recording.enabled", raw_rec.get("enabled"), True),
        input=flag("recording.input", raw_rec.get("input"), False),
        notice=flag("recording.notice", raw_rec.get("notice"), True),
    )
    raw_archive = section("archive", ("paths", "retention"))
    paths = raw_archive.get("paths", list(Archive.paths))
    if not isinstance(paths, list) or not 1 <= len(paths) <= MAX_ARCHIVE_PATHS:
        fail("archive.paths", f"must be a list of 1 to {MAX_ARCHIVE_PATHS} absolute paths")
        paths = list(Archive.paths)
    for i, p in enumerate(paths):
        if not isinstance(p, str) or not p.startswith("/") or ".." in p.split("/"):
            fail(f"archive.paths[{i}]", "must be an absolute path without '..'")
    retention = duration("archive.retention", raw_archive.get("retention"))
    archive = Archive(paths=tuple(str(p) for p in paths), retention=retention)
    raw_submit = section("submit", ("destroy",))
    submit = Submit(destroy=flag("submit.destroy", raw_submit.get("destroy"), False))
    warnings: list[str] = []
    claude = _claude(raw, section, fail, warnings, lambda p: lines.line(p), file)

    if problems:
        raise TemplateError(file, problems)
    assert ttl is not None and max_ttl is not None
    return Template(
        name=name,
        base_image=base_image,
        ttl=ttl,
        max_ttl=max_ttl,
        cpu_limit=cpu_limit,
        memory_limit=memory_limit,
        pids_limit=pids_limit,
        services=tuple(services),
        expose=tuple(exposes),
        env=env,
        workspace=workspace,
        claude=claude,
        description=description.strip(),
        source=file,
        pool=pool,
        task=task,
        recording=recording,
        archive=archive,
        submit=submit,
        warnings=tuple(warnings),
    )


def _claude(
    raw: dict[str, Any],
    section: Any,
    fail: Any,
    warnings: list[str],
    line_of: Any,
    file: str,
) -> Claude:
    """The ``claude:`` section; the older ``claude_auth: true|false`` still reads, as
    ``access: gateway`` or ``none``, with a deprecation warning."""
    default = Claude()
    if "claude_auth" in raw:
        old = raw["claude_auth"]
        if "claude" in raw:
            fail("claude_auth", "is replaced by claude.access: keep only the claude section")
        elif not isinstance(old, bool):
            fail("claude_auth", "must be true or false (deprecated: use claude.access)")
        else:
            access = "gateway" if old else "none"
            warnings.append(
                f"{file}:{line_of('claude_auth')}: claude_auth is deprecated: write"
                f" 'claude: {{access: {access}}}' (credentials no longer enter a sandbox:"
                " docs/claude.md)"
            )
            return Claude(access=access)
    given = section("claude", ("access", "model", "budget_tokens", "max_tokens", "settings"))
    access = given.get("access", default.access)
    if access not in CLAUDE_ACCESS:
        fail("claude.access", f"must be one of {', '.join(CLAUDE_ACCESS)}")
        access = default.access
    model = given.get("model")
    if model is not None and (not isinstance(model, str) or not MODEL.match(model)):
        fail("claude.model", "must be a model name such as claude-sonnet-4-5")
        model = None

    def whole(path: str, value: Any, low: int, high: int, fallback: int) -> int:
        if value is None:
            return fallback
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            fail(path, f"must be a whole number from {low:,} to {high:,}")
            return fallback
        return value

    budget_tokens = whole(
        "claude.budget_tokens", given.get("budget_tokens"), 1, MAX_BUDGET, default.budget_tokens
    )
    max_tokens = whole("claude.max_tokens", given.get("max_tokens"), 1, 128_000, default.max_tokens)
    settings = given.get("settings") or {}
    if not isinstance(settings, dict):
        fail("claude.settings", "must be a mapping (Claude Code's settings.json fields)")
        settings = {}
    elif len(json.dumps(settings)) > MAX_CLAUDE_SETTINGS:
        fail("claude.settings", f"is over {MAX_CLAUDE_SETTINGS} bytes as JSON")
        settings = {}
    return Claude(
        access=access,
        model=model,
        budget_tokens=budget_tokens,
        max_tokens=max_tokens,
        settings=settings,
    )


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
