"""The named presets of egress rules, read from the package managers themselves.

No host name is written down here: ``python-packages`` is the index pip in the sandbox's image
is configured with (``pip config``'s ``index-url`` and ``extra-index-url``, ``PIP_INDEX_URL``,
or pip's own default, PyPI, with PyPI's file host), ``node-packages`` is npm's ``registry``,
``go-modules`` the hosts of ``go env GOPROXY`` and ``GOSUMDB``. Each tool is asked inside the
sandbox's workspace, as its user, before anything of the candidate or the task runs there; the
answers are kept per image for the engine process's life. ``SANDBOX_EGRESS_PRESETS`` replaces
what a preset stands for.
"""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

from engine.backend import Backend

# What each preset asks in the workspace (sh -c), and what reads the answer into host names.
PIP_PROBE = (
    "python3 -c 'from pip._internal.models.index import PyPI;"
    ' print("default", PyPI.url); print("files", PyPI.file_storage_domain)\''
    ' && python3 -m pip config list 2>/dev/null; echo "env ${PIP_INDEX_URL:-}";'
    ' echo "env-extra ${PIP_EXTRA_INDEX_URL:-}"'
)
ASKED = {
    "python-packages": PIP_PROBE,
    "node-packages": "npm config get registry",
    "go-modules": "go env GOPROXY GOSUMDB",
}


class PresetError(RuntimeError):
    """A preset the template lists could not be read in its image."""


def host_of(url: str) -> list[str]:
    """The host name of a URL (or of a bare ``host[:port]``), as a list: empty for none."""
    url = url.strip().strip("'\"")
    name = urlsplit(url if "//" in url else "//" + url).hostname
    return [name.lower()] if name else []


def pip_hosts(answer: str) -> list[str]:
    """python-packages from PIP_PROBE's answer: the index pip uses (``PIP_INDEX_URL`` over
    its config over its default; with the default, PyPI's file host too) and the extra ones."""
    default = files = configured = from_env = ""
    extra: list[str] = []
    for line in answer.splitlines():
        key, eq, value = line.partition("=")
        if eq and " " not in key:  # pip config list: global.index-url='…'
            value = value.strip().strip("'\"")
            if key.endswith(".extra-index-url"):
                extra += value.split()
            elif key.endswith(".index-url"):
                configured = value
            continue
        key, _, value = line.partition(" ")
        value = value.strip()
        if key == "default":
            default = value
        elif key == "files":
            files = value
        elif key == "env":
            from_env = value
        elif key == "env-extra":
            extra += value.split()
    index = from_env or configured or default
    if not index:
        raise ValueError("pip named no index")
    hosts = host_of(index) + [h for url in extra for h in host_of(url)]
    if index == default and files:
        hosts.append(files.lower())  # where PyPI's index points for files
    return sorted(set(hosts))


def npm_hosts(answer: str) -> list[str]:
    return host_of(answer.strip().splitlines()[-1]) if answer.strip() else []


def go_hosts(answer: str) -> list[str]:
    """go-modules from ``go env GOPROXY GOSUMDB``: each proxy but direct/off, and the checksum
    database (``name``, ``name+key`` or ``name+key url``) unless off."""
    lines = [*answer.strip().splitlines(), "", ""]
    proxy, sumdb = lines[0].strip(), lines[1].strip()
    hosts: list[str] = []
    for part in proxy.replace("|", ",").split(","):
        if part.strip() not in ("", "direct", "off"):
            hosts += host_of(part)
    if sumdb and sumdb != "off":
        words = sumdb.split()
        hosts += host_of(words[-1]) if len(words) > 1 else host_of(words[0].split("+")[0])
    return sorted(set(hosts))


READ = {"python-packages": pip_hosts, "node-packages": npm_hosts, "go-modules": go_hosts}


class Presets:
    def __init__(self, backend: Backend, overrides: dict[str, list[str]]) -> None:
        self.backend = backend
        self.overrides = overrides
        self._known: dict[tuple[str, str], list[str]] = {}  # (image, preset) → hosts
        self._lock = threading.Lock()

    def read(self, container: str, image: str, user: str, names: list[str]) -> dict[str, list[str]]:
        """Each preset's host names (blocking: a Docker exec per preset the first time per
        image)."""
        found: dict[str, list[str]] = {}
        for name in names:
            if name in self.overrides:
                found[name] = self.overrides[name]
                continue
            with self._lock:
                known = self._known.get((image, name))
            if known is None:
                known = self._ask(container, image, user, name)
                with self._lock:
                    self._known[(image, name)] = known
            found[name] = known
        return found

    def _ask(self, container: str, image: str, user: str, name: str) -> list[str]:
        ran = self.backend.run(container, ["sh", "-c", ASKED[name]], user=user)
        hint = "; SANDBOX_EGRESS_PRESETS can name its hosts"
        if ran.exit_code != 0:
            raise PresetError(
                f"preset {name}: its package manager in image {image} did not answer"
                f" (exit {ran.exit_code}: {ran.text.strip()[-200:]!r}){hint}"
            )
        try:
            hosts = READ[name](ran.text)
        except ValueError as exc:
            raise PresetError(f"preset {name} in image {image}: {exc}{hint}") from None
        if not hosts:
            raise PresetError(f"preset {name} in image {image}: no host configured{hint}")
        return hosts
