"""The package layout's rules, read from the source (pure): the engine never imports the
Pulumi project's package (``stacks/``), which imports nothing of the engine but its pure model;
the sandbox lifecycle reaches containers through the backend seam only; nothing of the engine
imports the HTTP layer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from engine.sandboxes.runs import PROVIDER_PARENT_ENV
from stacks.provider.server import PARENT_ENV
from tests.conftest import ROOT

# What stacks/ may take from the engine: the pure model and what it is made of.
MODEL = ("engine.model", "engine.errors", "engine.units")


def imports(folder: str) -> dict[str, set[str]]:
    """Every module under ``folder`` → the modules it imports (absolute names)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
        found[str(path.relative_to(ROOT))] = names
    return found


def test_the_engine_never_imports_the_pulumi_project() -> None:
    for module, names in imports("engine").items():
        assert not [n for n in names if n == "stacks" or n.startswith("stacks.")], module


def test_the_pulumi_project_takes_only_the_pure_model_from_the_engine() -> None:
    for module, names in imports("stacks").items():
        engine = [n for n in names if n == "engine" or n.startswith("engine.")]
        assert all(n.startswith(MODEL) for n in engine), (module, engine)


def test_the_engine_never_imports_the_http_layer() -> None:
    # The CLI is where the program is put together: `sandbox-engine serve` starts the API.
    composition_root = "engine/cli.py"
    for module, names in imports("engine").items():
        if module != composition_root:
            assert not [n for n in names if n == "api" or n.startswith("api.")], module


def test_only_the_backend_and_the_host_talk_to_docker() -> None:
    allowed = ("engine/backend/", "engine/host/", "engine/errors.py")
    for module, names in imports("engine").items():
        if not module.startswith(allowed):
            assert "docker" not in names and not any(n.startswith("docker.") for n in names), module
    for module, names in imports("api").items():
        assert "docker" not in names, module


def test_the_provider_and_the_engine_agree_on_the_parent_variable() -> None:
    assert PROVIDER_PARENT_ENV == PARENT_ENV


# Classes over about 300 lines and functions over about 60, each with its reason.
LONG = {
    "stacks/provider/container.py:Container": "the resource's schema, one row per field, and "
    "its CRUD as the provider protocol orders it",
    "stacks/provider/container.py:check_values": "one check per field of the schema, in order",
    "stacks/provider/container_spec.py:from_inspect": "Docker's inspect mapped back to the "
    "schema, field by field",
    "stacks/provider/container_spec.py:to_engine_config": "the schema mapped to Docker's create "
    "call, field by field",
    "stacks/provider/container_spec.py:normalize": "one normalisation per field of the schema",
    "engine/cli.py:build_parser": "argparse's table of every command and option",
    "engine/settings.py:Settings": "one field per setting, each with what it means",
    "engine/sandboxes/stacks.py:StackManager": "every stack operation (create, preview, "
    "destroy, recover, repair, refresh, list), each under its stack's lock",
    "engine/backend/swarm.py:SwarmBackend": "every method of the Backend protocol, each finding "
    "the task's node first",
    "stacks/provider/service.py:to_spec": "the schema mapped to Docker's ServiceSpec, field by "
    "field",
    "stacks/provider/service.py:from_spec": "Docker's ServiceSpec mapped back to the schema, "
    "field by field",
    "stacks/swarm.py:_service": "one Swarm service declared from a container's spec, field by "
    "field",
}
MAX_CLASS, MAX_FUNCTION = 300, 60


def test_no_class_or_function_is_long_without_saying_why() -> None:
    """Each part stays readable alone; the exceptions say why in LONG."""
    long = {}
    for folder in ("engine", "api", "stacks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
                    if lines > limit:
                        long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert {k: n for k, n in long.items() if k not in LONG} == {}
    assert set(LONG) <= set(long), "a reason for something no longer long: drop it from LONG"


def test_the_ui_has_no_import_circle() -> None:
    src = ROOT / "web" / "src"
    graph: dict[Path, set[Path]] = {}
    for path in [*src.rglob("*.ts"), *src.rglob("*.tsx")]:
        targets = re.findall(r"""^import [^;]*?from "(\.[^"]+)";""", path.read_text(), re.M | re.S)
        graph[path] = set()
        for target in targets:
            base = (path.parent / target).resolve()
            found = [base.with_name(base.name + e) for e in (".ts", ".tsx")] + [base]
            graph[path] |= {f for f in found if f.is_file()}

    def circle(start: Path, at: Path, seen: tuple[Path, ...]) -> tuple[Path, ...] | None:
        for nxt in graph.get(at, ()):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = circle(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    assert len(graph) > 10
    for module in graph:
        found = circle(module, module, (module,))
        assert found is None, " -> ".join(str(p.relative_to(src)) for p in found or ())
