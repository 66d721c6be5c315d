"""The template file's fields, declared once: typed models that the loader validates a YAML
document with (engine/model/templates.py), that the API describes templates from, and that
docs/templates.md's field table is generated from (``python -m engine.model.schema``).

Every field's checks run in the order written (``Checks``) and raise the template's own
messages ("must be a port number from 1 to 65535"): YAML gives ints, booleans and strings
where a reader may not expect them, so nothing is coerced but what a unit parser reads. A
check about another field than the one it runs on names that field's path (``problem(…,
at=…)``); the loader maps every error to the YAML node's line.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from engine.model.egress import MAX_ENTRIES, MODES, entry_problem
from engine.units import format_duration, parse_cpus, parse_duration, parse_memory

NAME = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,99}$")
SERVICES = ("postgres", "redis")
CLAUDE_ACCESS = ("gateway", "none", "operator-login")
# Container runtimes a template may ask for (docs/security.md): Docker's own, and gVisor.
RUNTIMES = ("runc", "runsc")
DEFAULT_PIDS_LIMIT = 1024
MAX_POOL = 50
MAX_INIT = 20  # init commands of a task
MAX_ARCHIVE_PATHS = 10
MAX_CLAUDE_SETTINGS = 16 * 1024  # bytes of the template's managed settings, as JSON
MAX_BUDGET = 10**10
MIN_DISK, MAX_DISK = 64 * 2**20, 2**44
TASKS_FOLDER = "tasks"  # beside the templates: templates/tasks/<folder>

SECTION = ConfigDict(extra="forbid")
Step = Callable[[Any], Any]


def problem(message: str, at: str | None = None) -> PydanticCustomError:
    """A template error; ``at`` is the field path it is about when that is not where the
    check ran (a ttl checked against max_ttl)."""
    return PydanticCustomError("template", message, {"at": at} if at else None)


def Checks(*steps: Step) -> BeforeValidator:
    """The steps in the order given, each taking the value and returning it (or what it
    reads as), or raising a problem."""

    def run(value: Any) -> Any:
        for step in steps:
            value = step(value)
        return value

    return BeforeValidator(run)


def must(test: Callable[[Any], bool], message: str) -> Step:
    def check(value: Any) -> Any:
        if not test(value):
            raise problem(message)
        return value

    return check


def null_is(default: Any) -> Step:
    return lambda value: default if value is None else value


def parsed(parse: Callable[[str], Any]) -> Step:
    """A unit read by engine/units.py ("4Gi", "500m", "1h30m") from whatever YAML gave."""

    def read(value: Any) -> Any:
        if isinstance(value, timedelta):
            return value
        try:
            return parse(str(value))
        except ValueError as exc:
            raise problem(str(exc)) from None

    return read


def whole(low: int, high: int, message: str | None = None) -> Step:
    return must(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high,
        message or f"must be a whole number from {low:,} to {high:,}",
    )


def listed(message: str, *, least: int = 0, most: int | None = None) -> Step:
    return must(
        lambda v: isinstance(v, list | tuple) and least <= len(v) <= (most or len(v)), message
    )


def section(cls: type) -> Step:
    """A mapping of the section's own fields; empty when the key is there with no value."""
    known = ", ".join(cls.__pydantic_fields__)  # type: ignore[attr-defined]

    def mapping(value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict | cls):
            raise problem(f"must be a mapping ({known})")
        return value

    return mapping


def once(values: tuple[Any, ...], key: Step, path: Callable[[int], str], says: Step) -> None:
    seen: set[Any] = set()
    for i, value in enumerate(values):
        if key(value) in seen:
            raise problem(says(value), path(i))
        seen.add(key(value))


required = must(lambda v: v is not None, "is required")
text = must(lambda v: isinstance(v, str) and bool(v.strip()), "must be a non-empty string")
flag = must(lambda v: isinstance(v, bool), "must be true or false")
absolute = must(lambda v: v.startswith("/"), "must be an absolute path")
duration = parsed(parse_duration)
port = whole(1, 65535, "must be a port number from 1 to 65535")
processes = whole(16, 65536, "must be a whole number of processes from 16 to 65536")
folder_name = must(
    lambda v: isinstance(v, str) and bool(NAME.fullmatch(v)),
    "must name a folder of templates/tasks/ (lowercase, digits, dashes)",
)
commands = listed(f"must be a list of at most {MAX_INIT} commands", most=MAX_INIT)
command = must(
    lambda v: isinstance(v, str) and bool(v.strip()) and len(v) <= 4096,
    "must be a shell command (a non-empty string, 4 KiB at most)",
)
archive_paths = listed(
    f"must be a list of 1 to {MAX_ARCHIVE_PATHS} absolute paths", least=1, most=MAX_ARCHIVE_PATHS
)
archive_path = must(
    lambda v: isinstance(v, str) and v.startswith("/") and ".." not in v.split("/"),
    "must be an absolute path without '..'",
)
access_mode = must(lambda v: v in CLAUDE_ACCESS, f"must be one of {', '.join(CLAUDE_ACCESS)}")
model_name = must(
    lambda v: v is None or (isinstance(v, str) and bool(MODEL.match(v))),
    "must be a model name such as claude-sonnet-4-5",
)
env_mapping = must(lambda v: isinstance(v, dict), "must be a mapping of NAME: value")
env_name = must(lambda v: bool(ENV_KEY.match(str(v))), "is not a valid variable name")
template_name = must(
    lambda v: bool(NAME.match(v)),
    "must be 2-40 lowercase letters, digits and dashes, starting with a letter",
)
old_flag = must(
    lambda v: v is None or isinstance(v, bool),
    "must be true or false (deprecated: use claude.access)",
)


@dataclass(frozen=True, config=SECTION)
class Resources:
    """What the workspace container may use, and the sandbox's disk (docs/security.md)."""

    cpu_limit: Annotated[float, Checks(parsed(parse_cpus))] = Field(
        default=1.0, description='CPU cores: "2", "0.5", "500m"', json_schema_extra={"shown": "1"}
    )
    memory_limit: Annotated[
        int, Checks(parsed(parse_memory), must(lambda v: v >= 64 * 2**20, "must be at least 64Mi"))
    ] = Field(
        default=2 * 2**30,
        description="memory: 512Mi, 4Gi, 1G or bytes; at least 64Mi",
        json_schema_extra={"shown": "2Gi"},
    )
    pids_limit: Annotated[int, Checks(processes)] = Field(
        default=DEFAULT_PIDS_LIMIT, description="processes in the workspace, 16-65536"
    )
    disk_limit: Annotated[
        int | None,
        Checks(
            lambda v: v if v is None else parsed(parse_memory)(v),
            must(lambda v: v is None or v >= MIN_DISK, "must be at least 64Mi"),
            must(lambda v: v is None or v <= MAX_DISK, "must be at most 16Ti"),
        ),
    ] = Field(
        default=None,
        description="what the sandbox can write, its services' data too (10Gi, 500Mi): a disk"
        " of its own; default SANDBOX_DISK_LIMIT",
        json_schema_extra={"shown": "SANDBOX_DISK_LIMIT (10Gi)"},
    )


@dataclass(frozen=True, config=SECTION)
class Expose:
    """A workspace port; a public one is routed by Traefik at ``<sandbox>-<port>.<domain>``."""

    container: Annotated[int, Checks(port)] = Field(description="the workspace port, 1-65535")
    public: Annotated[bool, Checks(flag)] = Field(
        default=False, description="routed by Traefik at `<id>-<port>.<domain>`"
    )


@dataclass(frozen=True, config=SECTION)
class Workspace:
    """Who the terminal's shell runs as, and where."""

    user: Annotated[str, Checks(null_is("coder"), text)] = Field(
        default="coder", description="the shell's user"
    )
    workdir: Annotated[str, Checks(null_is("/home/coder/workspace"), text, absolute)] = Field(
        default="/home/coder/workspace", description="where the shell starts; absolute"
    )
    shell: Annotated[str, Checks(null_is("/bin/bash"), text, absolute)] = Field(
        default="/bin/bash", description="the login shell; absolute"
    )


@dataclass(frozen=True, config=SECTION)
class Task:
    """What a candidate starts from: ``templates/tasks/<folder>`` copied into the workspace's
    workdir (owned by the workspace user), optionally made a git repository with a first
    commit, then ``init`` commands run as the workspace user (their output in the events)."""

    folder: Annotated[
        str,
        Checks(folder_name),
    ] = Field(
        default="",
        validate_default=True,
        description="a folder of templates/tasks/",
        json_schema_extra={"shown": "required"},
    )
    git: Annotated[bool, Checks(null_is(True), flag)] = Field(
        default=True, description="make the workdir a repository with the task as its first commit"
    )
    init: Annotated[
        tuple[
            Annotated[
                str,
                Checks(command),
            ],
            ...,
        ],
        Checks(null_is(()), commands),
    ] = Field(default=(), description=f"commands run as the workspace user; at most {MAX_INIT}")

    @field_validator("folder")
    @classmethod
    def _beside_the_template(cls, value: str, info: ValidationInfo) -> str:
        file = (info.context or {}).get("file")
        if file:
            tasks = Path(file).parent / TASKS_FOLDER
            where = tasks / value
            if not where.is_dir() or tasks.resolve() not in where.resolve().parents:
                raise problem(f"{TASKS_FOLDER}/{value} is not a folder beside the template")
        return value


@dataclass(frozen=True, config=SECTION)
class Recording:
    """Terminal sessions recorded as asciicast v2: output always (when enabled), keystrokes
    only with ``input``; ``notice`` tells the candidate the session is recorded."""

    enabled: Annotated[bool, Checks(null_is(True), flag)] = Field(
        default=True, description="record every terminal session"
    )
    input: Annotated[bool, Checks(null_is(False), flag)] = Field(
        default=False, description="keystrokes too"
    )
    notice: Annotated[bool, Checks(null_is(True), flag)] = Field(
        default=True, description='tell the candidate "This session is recorded"'
    )


@dataclass(frozen=True, config=SECTION)
class Archive:
    """What is archived before the sandbox is destroyed (expiry, delete or submit), and for
    how long it is kept (None: the engine's ``archive_retention``)."""

    paths: Annotated[
        tuple[
            Annotated[
                str,
                Checks(archive_path),
            ],
            ...,
        ],
        Checks(archive_paths),
    ] = Field(default=("/home/coder",), description=f"absolute, 1-{MAX_ARCHIVE_PATHS}")
    retention: Annotated[timedelta | None, Checks(lambda v: v if v is None else duration(v))] = (
        Field(
            default=None,
            description="how long the archive is kept; default SANDBOX_ARCHIVE_RETENTION",
        )
    )
    max_bytes: Annotated[
        int | None,
        Checks(
            lambda v: v if v is None else parsed(parse_memory)(v),
            must(lambda v: v is None or v >= 2**20, "must be at least 1Mi"),
        ),
    ] = Field(
        default=None,
        description="bytes of files the archive holds at most (512Mi, 1G); at most"
        " SANDBOX_ARCHIVE_MAX_BYTES, its default",
    )


@dataclass(frozen=True, config=SECTION)
class Submit:
    """What a candidate's submit does after archiving: ``destroy`` the sandbox too."""

    destroy: Annotated[bool, Checks(null_is(False), flag)] = Field(
        default=False, description="destroy the sandbox after a candidate's submit"
    )


def _settings_size(value: dict[str, Any]) -> dict[str, Any]:
    try:
        size = len(json.dumps(value))
    except (TypeError, ValueError):
        raise problem("must hold JSON values only (strings, numbers, lists, mappings)") from None
    if size > MAX_CLAUDE_SETTINGS:
        raise problem(f"is over {MAX_CLAUDE_SETTINGS} bytes as JSON")
    return value


@dataclass(frozen=True, config=SECTION)
class Claude:
    """How Claude Code in the sandbox reaches the model (docs/claude.md). ``gateway``: through
    the engine's AI gateway with a token good for this sandbox alone, within ``budget_tokens``
    (engine/ai/budget.py), ``max_tokens`` a request, the pinned ``model`` if one is set;
    ``none``: no access is configured; ``operator-login``: a copy of the operator's own
    Claude Code login in the sandbox (it exposes it to whoever has the shell: never for
    candidates). ``settings`` become root-owned managed settings the candidate cannot change."""

    access: Annotated[str, Checks(access_mode)] = Field(
        default="gateway", description=" \\| ".join(CLAUDE_ACCESS)
    )
    model: Annotated[
        str | None,
        Checks(model_name),
    ] = Field(default=None, description="the one model allowed; none: any")
    budget_tokens: Annotated[int, Checks(null_is(2_000_000), whole(1, MAX_BUDGET))] = Field(
        default=2_000_000, description="billed tokens per sandbox (docs/claude.md)"
    )
    max_tokens: Annotated[int, Checks(null_is(32_000), whole(1, 128_000))] = Field(
        default=32_000, description="cap on one request's output"
    )
    settings: Annotated[
        dict[str, Any],
        Checks(
            null_is({}),
            must(
                lambda v: isinstance(v, dict),
                "must be a mapping (Claude Code's settings.json fields)",
            ),
            _settings_size,
        ),
    ] = Field(default_factory=dict, description="root-owned managed settings of Claude Code")


def _allow_entry(value: Any) -> Any:
    found = entry_problem(value)
    if found:
        raise problem(found)
    return str(value).strip().lower()


@dataclass(frozen=True, config=SECTION)
class Network:
    """What the sandbox may reach outside its own network (docs/security.md, Egress).
    ``open``: anything; ``none``: nothing but its own services and the engine's AI gateway;
    ``allow``: only what ``allow`` lists, through the engine's egress proxy."""

    egress: Annotated[
        str,
        Checks(null_is("open"), must(lambda v: v in MODES, f"must be one of {', '.join(MODES)}")),
    ] = Field(default="open", description=" \\| ".join(MODES))
    allow: Annotated[
        tuple[Annotated[str, Checks(_allow_entry)], ...],
        Checks(
            null_is(()),
            listed(f"must be a list of at most {MAX_ENTRIES} entries", most=MAX_ENTRIES),
        ),
    ] = Field(
        default=(),
        validate_default=True,
        description="with egress allow: presets (python-packages, node-packages, go-modules),"
        " host names, *.domains, IP networks",
    )

    @field_validator("allow")
    @classmethod
    def _only_with_allow(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        egress = info.data.get("egress")
        if value and egress != "allow":
            raise problem(f"lists entries, but egress is {egress!r} (set egress: allow)")
        if egress == "allow" and not value:
            raise problem("egress allow needs at least one entry here")
        once(value, str, lambda i: f"network.allow[{i}]", lambda e: f"{e!r} is listed twice")
        return value


def _env_value(value: Any) -> Any:
    if not isinstance(value, str | int | float | bool):
        raise problem("must be a string")
    return str(value).lower() if isinstance(value, bool) else str(value)


def _service(value: Any) -> Any:
    if value not in SERVICES:
        raise problem(f"unknown service {value!r} (known: {', '.join(SERVICES)})")
    return value


class TemplateFile(BaseModel):
    """One template file (``templates/<name>.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[
        str,
        Checks(required, text, template_name),
    ] = Field(description="2-40 of a-z 0-9 -, starting with a letter; the file's name")
    description: Annotated[
        str, Checks(null_is(""), must(lambda v: isinstance(v, str), "must be a string"), str.strip)
    ] = Field(default="", description="shown in the UI and the API")
    base_image: Annotated[str, Checks(required, text)] = Field(
        description="the workspace image (docs/images.md)"
    )
    services: Annotated[
        tuple[
            Annotated[str, Checks(_service)],
            ...,
        ],
        Checks(null_is(()), listed("must be a list of service names")),
    ] = Field(default=(), description=f"each at most once: {', '.join(SERVICES)}")
    runtime: Annotated[
        str | None,
        Checks(must(lambda v: v is None or v in RUNTIMES, f"must be one of {', '.join(RUNTIMES)}")),
    ] = Field(
        default=None,
        description="the containers' runtime: runc, or runsc (gVisor); default SANDBOX_RUNTIME",
    )
    resources: Annotated[Resources, Checks(section(Resources))] = Field(
        default=Resources(), description="limits of the workspace container"
    )
    ttl: Annotated[timedelta, Checks(required, duration)] = Field(
        description='time to live: h, m, s ("4h", "1h30m")'
    )
    max_ttl: timedelta = Field(
        default=None,
        validate_default=True,
        description="the most a create or an extension may ask; default: the ttl",
    )
    expose: Annotated[
        tuple[
            Annotated[
                Expose,
                Checks(
                    must(
                        lambda v: isinstance(v, dict | Expose),
                        "must be a mapping with container and public",
                    )
                ),
            ],
            ...,
        ],
        Checks(null_is(()), listed("must be a list")),
    ] = Field(default=(), description="workspace ports, each at most once")
    env: Annotated[
        dict[
            Annotated[str, Checks(env_name)],
            Annotated[str, Checks(_env_value)],
        ],
        Checks(null_is({}), env_mapping),
    ] = Field(default_factory=dict, description="extra environment of the workspace")
    network: Annotated[Network, Checks(section(Network))] = Field(
        default=Network(), description="what the sandbox may reach outside (docs/security.md)"
    )
    workspace: Annotated[Workspace, Checks(section(Workspace))] = Field(
        default=Workspace(), description="the terminal's user, directory and shell"
    )
    claude: Annotated[Claude, Checks(section(Claude))] = Field(
        default=Claude(), description="Claude Code in the sandbox (docs/claude.md)"
    )
    claude_auth: Annotated[
        bool | None,
        Checks(old_flag),
    ] = Field(
        default=None, description="deprecated: true reads as claude.access gateway, false as none"
    )
    pool: Annotated[int, Checks(whole(0, MAX_POOL))] = Field(
        default=0, description=f"sandboxes kept created ahead (the warm pool), 0-{MAX_POOL}"
    )
    task: Annotated[Task | None, Checks(section(Task), lambda v: v or None)] = Field(
        default=None, description="what the candidate starts from (docs/templates.md#tasks)"
    )
    recording: Annotated[Recording, Checks(section(Recording))] = Field(
        default=Recording(), description="terminal sessions as asciicast v2 (docs/hiring.md)"
    )
    archive: Annotated[Archive, Checks(section(Archive))] = Field(
        default=Archive(), description="archived before the sandbox goes (docs/hiring.md)"
    )
    submit: Annotated[Submit, Checks(section(Submit))] = Field(
        default=Submit(), description="what a candidate's submit does"
    )

    @field_validator("name")
    @classmethod
    def _the_file_s_name(cls, value: str, info: ValidationInfo) -> str:
        file = (info.context or {}).get("file")
        if file and Path(file).stem != value:
            raise problem(f"must match the file name ({Path(file).stem!r})")
        return value

    @field_validator("services")
    @classmethod
    def _services_once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        once(value, str, lambda i: f"services[{i}]", lambda s: f"{s!r} is listed twice")
        return value

    @field_validator("expose")
    @classmethod
    def _ports_once(cls, value: tuple[Expose, ...]) -> tuple[Expose, ...]:
        once(
            value,
            lambda e: e.container,
            lambda i: f"expose[{i}].container",
            lambda e: f"port {e.container} is exposed twice",
        )
        return value

    @field_validator("max_ttl", mode="before")
    @classmethod
    def _at_least_the_ttl(cls, value: Any, info: ValidationInfo) -> Any:
        ttl = info.data.get("ttl")
        if value is None:
            # Without a valid ttl the ttl's own error is the one reported.
            return ttl or timedelta(0)
        longest = duration(value)
        if ttl is not None and ttl > longest:
            raise problem(f"is longer than max_ttl ({value})", "ttl")
        return longest


def _inner(annotation: Any) -> Any:
    """A field's type without Annotated, Optional and the tuple or dict around an item."""
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is Annotated or origin in (tuple, list):
            annotation = args[0]
        elif origin is dict:
            annotation = args[1]
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in args if a is not type(None))
        else:
            return annotation


def fields_of(cls: Any) -> dict[str, Any]:
    """The declared fields of the file or of a section (name → FieldInfo)."""
    return dict(getattr(cls, "model_fields", None) or getattr(cls, "__pydantic_fields__", {}))


def model_at(loc: tuple[str | int, ...]) -> Any:
    """The file or section a location of the file is inside of (for its known fields)."""
    current: Any = TemplateFile
    for part in loc:
        if isinstance(part, int):
            continue
        field = fields_of(current).get(part)
        if field is None:
            return None
        current = _inner(field.annotation)
    return current


def describe(path: str) -> str:
    """The description of a field path of the file (``resources.cpu_limit``): the API's
    template answers are described from here."""
    *parents, name = path.split(".")
    info = fields_of(model_at(tuple(parents)))[name]
    return str(info.description)


def field_table() -> str:
    """docs/templates.md's table of fields, from the models."""
    rows = ["| field | default | what |", "|---|---|---|"]
    for name, info in fields_of(TemplateFile).items():
        inner = _inner(info.annotation)
        if not fields_of(inner):
            rows.append(f"| `{name}` | {_default(info)} | {info.description} |")
            continue
        rows.append(f"| `{name}` | | {info.description} |")
        prefix = f"{name}[]." if name == "expose" else f"{name}."
        for key, part in fields_of(inner).items():
            rows.append(f"| `{prefix}{key}` | {_default(part)} | {part.description} |")
    return "\n".join(rows) + "\n"


def _default(info: Any) -> str:
    shown = (info.json_schema_extra or {}).get("shown")
    if shown:
        return "required" if shown == "required" else f"`{shown}`"
    if info.is_required():
        return "required"
    default = info.get_default(call_default_factory=True)
    if default is None and info.validate_default:
        return "the ttl"
    if isinstance(default, timedelta):
        return f"`{format_duration(default)}`"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if default is None or default in ("", (), {}):
        return "none"
    if isinstance(default, tuple):
        return f"`[{', '.join(map(str, default))}]`"
    return f"`{default}`"


BEGIN, END = "<!-- fields: begin -->", "<!-- fields: end -->"


def with_table(doc: str) -> str:
    """A document with the field table between its markers made current."""
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{field_table()}{END}{tail}"


if __name__ == "__main__":  # python -m engine.model.schema [docs/templates.md]: the table
    import sys

    if len(sys.argv) > 1:
        doc = Path(sys.argv[1])
        doc.write_text(with_table(doc.read_text()))
    else:
        print(field_table(), end="")
