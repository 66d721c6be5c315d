"""The engine's one settings object, read from ``SANDBOX_*`` environment variables.

Defaults describe a checkout on a developer's machine: the project-local PostgreSQL cluster
started by ``deploy/local/postgres.sh`` and the toolchain linked into ``.toolchain/bin``.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.units import parse_memory

# The checkout this package runs from, when it runs from one (an editable install).
_CHECKOUT = Path(__file__).resolve().parent.parent


def _default_project_dir() -> Path:
    return _CHECKOUT if (_CHECKOUT / "Pulumi.yaml").is_file() else Path.cwd()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SANDBOX_", extra="ignore")

    # Folder holding Pulumi.yaml and stacks/: the Pulumi project every sandbox stack belongs to.
    project_dir: Path = Field(default_factory=_default_project_dir)
    # Folder for local state: PostgreSQL data, PULUMI_HOME, the passphrase file, logs.
    state_dir: Path | None = None
    # Folder with the pulumi CLI, its language host and traefik (made by toolchain/build.sh).
    toolchain_bin: Path | None = None
    # The engine's database: keys, sandboxes, events, and (by default) the Pulumi state.
    database_url: SecretStr = SecretStr("postgresql://sandbox:sandbox@127.0.0.1:55432/sandbox")
    # Pulumi state backend: postgres://…, file://… or empty for the engine's own database.
    pulumi_backend_url: SecretStr | None = None
    # Table that holds Pulumi state when the backend is the engine's database.
    pulumi_state_table: str = "pulumi_state"
    # Public ports of sandboxes are served at <sandbox-id>-<port>.<domain>.
    domain: str = "localhost"
    # The engine's creates and destroys attach to one long-lived docker provider process
    # instead of starting one per run (false: a provider per run, as the plain CLI does).
    shared_provider: bool = True
    # Seconds one Pulumi run that touches resources (up, destroy, refresh, preview) may take;
    # past it the run is stopped and the operation fails naming the bound. Other runs (stack
    # ls, stack init, config…) have 120 s (engine/sandboxes/pulumi_cli.py).
    pulumi_timeout: float = Field(default=900, ge=10, le=86400)
    # Seconds a stop (SIGINT, SIGTERM) gives requests and stack operations in flight to finish;
    # what is still running then is cut short and left for the next start's recovery.
    stop_timeout: float = Field(default=30, ge=0, le=3600)
    # How many Pulumi operations (up, destroy, preview…) run at once.
    max_stack_operations: int = Field(default=4, ge=1, le=64)
    # Folder holding the sandbox templates (*.yaml).
    templates_dir: Path | None = None
    # The built web UI; default web/dist in the project.
    web_dir: Path | None = None
    # Cold creates one engine process runs or queues at once; past it a create is answered 503
    # with Retry-After (a warm pool sandbox is still handed out). Each running one costs a
    # Pulumi CLI (~150 MB); queued ones wait for one of max_stack_operations.
    max_pending_creates: int = Field(default=20, ge=1, le=10000)
    # Live sandboxes one API key may hold at once.
    max_live_sandboxes_per_key: int = Field(default=5, ge=1, le=10000)
    # Creates one API key may request per minute.
    creates_per_minute: int = Field(default=30, ge=1, le=10000)
    # Failed authentications (bad key or access token) one client address may make per minute;
    # past it, its requests needing a credential are answered 429 (api/failures.py).
    auth_failures_per_minute: int = Field(default=30, ge=1, le=100000)
    # Signs candidate access tokens; empty: a random key kept in .state/secret-key.
    secret_key: SecretStr = SecretStr("")
    # Seconds between reaper passes (expired sandboxes are destroyed); 0 turns it off.
    reap_interval: float = Field(default=15, ge=0, le=3600)
    # Seconds before expiry a sandbox's terminals are warned (and an event is written); 0: never.
    warn_before: float = Field(default=300, ge=0, le=86400)
    # Seconds between orphan sweeps (stacks and labelled objects no live sandbox owns).
    sweep_interval: float = Field(default=300, ge=1, le=86400)
    # Days destroyed sandboxes (rows and events) are kept for audit before they are pruned.
    retention_days: int = Field(default=30, ge=1, le=3650)
    # Empty stacks kept initialised ahead: a cold create takes one instead of running
    # `pulumi stack init` itself (0: every create initialises its own).
    stack_reserve: int = Field(default=2, ge=0, le=50)
    # Seconds a warm-pool sandbox waits for a claim before it is recycled (made afresh).
    pool_max_age: float = Field(default=21600, ge=60, le=7 * 86400)
    # Address the API listens on.
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8000, ge=1, le=65535)
    # Docker network Traefik reaches published workspaces on (inter-container traffic off).
    edge_network: str = Field(default="sandbox-edge", pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    # The container runtime of sandboxes whose template sets none: runc (Docker's), or runsc
    # (gVisor, registered with dockerd under that name: docs/security.md).
    runtime: str = Field(default="runc", pattern=r"^(runc|runsc)$")
    # The edge network's subnet: every live sandbox with a public port holds one address of it
    # (a /20: 4,094). A private range the host does not route, apart from Docker's address
    # pools; empty: whatever Docker's default pool gives (a /26 there: 61 sandboxes).
    edge_subnet: str = "10.212.0.0/20"
    # Traefik entrypoint of sandbox routes, and its certificate resolver (empty: plain HTTP).
    entrypoint: str = Field(default="web", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    tls_resolver: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,64}$")
    # Port in published URLs (http://<id>-<port>.<domain>:<public_port>); 0: the scheme's own
    # (80/443, production). `make run` sets the local Traefik's port.
    public_port: int = Field(default=0, ge=0, le=65535)
    # The local Traefik (make run): its HTTP port, and the port of its ping endpoint.
    edge_host: str = "127.0.0.1"
    edge_port: int = Field(default=8088, ge=1, le=65535)
    edge_ping_port: int = Field(default=8089, ge=1, le=65535)
    # More engine processes on the same database (docs/cluster.md) that the local Traefik
    # balances the API, the UI and terminals across, besides this one's listen port:
    # comma-separated base URLs, e.g. http://127.0.0.1:8001,http://10.0.0.5:8000.
    edge_engines: str = Field(
        default="", pattern=r"^(https?://[A-Za-z0-9.:\[\]-]+/?(,https?://[A-Za-z0-9.:\[\]-]+/?)*)?$"
    )
    # Folder of terminal session recordings (asciicast files); default <state dir>/recordings.
    recordings_dir: Path | None = None
    # How long a recording is kept after its session ended (seconds or ISO 8601, e.g. P30D).
    recording_retention: timedelta = Field(default=timedelta(days=30), ge=timedelta(hours=1))
    # Seconds without input or output after which a terminal session counts as idle.
    idle_after: float = Field(default=300, ge=0.5, le=86400)
    # Folder of workspace archives (made before a destroy and on submit); default
    # <state dir>/archives.
    archives_dir: Path | None = None
    # How long an archive is kept when its template sets no archive.retention (seconds or
    # ISO 8601, e.g. P30D).
    archive_retention: timedelta = Field(default=timedelta(days=30), ge=timedelta(hours=1))
    # Attempts at one archive before the destroy goes on without it (1 s, 2 s… between them).
    archive_attempts: int = Field(default=3, ge=1, le=10)
    # Seconds all attempts at one archive may take together (plus one Docker call's 30 s).
    archive_timeout: float = Field(default=120, ge=1, le=3600)
    # Bytes of the workspace's files one archive holds at most (512Mi, 1G or bytes; a
    # template's archive.max_bytes may lower it): files past it are left out and named in the
    # archive's notes, so an archive never takes more than this of the engine's disk.
    archive_max_bytes: int = Field(default=512 * 2**20, ge=2**20, le=2**40)

    # Where sandboxes run (docs/cluster.md): docker, the host's dockerd (DOCKER_HOST); swarm,
    # a Docker Swarm cluster: its manager's API (swarm_manager, tcp://host:port) and every
    # node's, all over mutual TLS with the certificates in swarm_tls (ca.pem, cert.pem,
    # key.pem; deploy/swarm/certs.sh makes them).
    backend: str = Field(default="docker", pattern=r"^(docker|swarm)$")
    swarm_manager: str = Field(default="", pattern=r"^(tcp://[A-Za-z0-9.:\[\]-]+)?$")
    swarm_tls: Path | None = None
    # The port of every node's Docker API (TLS); a node's address is the one it joined with.
    swarm_node_port: int = Field(default=2376, ge=1, le=65535)
    # The engine's host as containers on the nodes reach it (the AI gateway, the egress
    # proxy); empty: the manager's address on its network, as the nodes see it.
    swarm_engine_address: str = ""
    # Seconds a sandbox's service waits for Swarm to find a node with room for it (capacity
    # freed by a destroy, a node joining); past it the create fails naming what Swarm said
    # ("no suitable node (insufficient resources on 3 nodes)") and nothing of it is left.
    swarm_placement_timeout: float = Field(default=60, ge=5, le=3600)
    # Sandbox overlays encrypted (IPsec between nodes): only where the nodes' kernels have
    # ESP and AES-GCM (`make doctor` says); elsewhere Docker makes the network and its traffic
    # goes nowhere, silently.
    swarm_encrypt: bool = False
    # The swarm's edge (docs/cluster.md): the name of a Traefik container on the manager node
    # whose swarm provider routes published sandboxes (the engine connects it to each one's
    # overlay), and its entrypoint's URL as this host reaches it (this host's Traefik sends
    # sandbox hosts there). Empty: templates with public ports are refused on a swarm.
    swarm_edge: str = Field(default="", pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]*)?$")
    swarm_edge_url: str = Field(default="", pattern=r"^(https?://[A-Za-z0-9.:\[\]-]+)?$")

    # Every sandbox writes to a disk of its own (engine/host/disks.py, docs/security.md): a
    # loop-mounted ext4 file of its template's resources.disk_limit, or this for templates
    # that set none (10Gi, 1G or bytes). False: Docker's volumes on the host's disk, with no
    # bound (a candidate can fill the host's disk; for hosts that cannot loop-mount).
    disks: bool = True
    disk_limit: int = Field(default=10 * 2**30, ge=64 * 2**20, le=2**44)
    # Folder of the disks on the host; default <state dir>/disks. A file system of its own in
    # production (docs/operations.md, Disks).
    disk_dir: Path | None = None
    # An image with nsenter to run the disk commands in (a one-shot container in dockerd's
    # mount namespace) when the engine is not root on the host (the compose file's engine);
    # empty: the engine's own process runs them.
    disk_helper_image: str = ""

    # Egress rules (docs/security.md, Egress): sandboxes of templates with `network.egress`
    # none or allow reach outside only through the engine's egress proxy, which runs wherever
    # the AI gateway runs (`serve`, or `sandbox-engine gateway`) on this port of the host (the
    # host firewall admits sandboxes to it); the workspace finds it as egress-proxy:<port>.
    egress_port: int = Field(default=8792, ge=1, le=65535)
    # Its port for what a restricted sandbox sends past it (the host firewall redirects such
    # TCP here): recorded as refused, then closed.
    egress_catch_port: int = Field(default=8793, ge=1, le=65535)
    # The host's address restricted workspaces reach the proxy at (their `egress-proxy`);
    # empty: Docker's default bridge's gateway, asked of dockerd (Docker 20.10's own
    # `host-gateway` can come back empty after a restart of dockerd).
    egress_proxy_address: str = ""
    # Host names a preset stands for, in place of what the image's package managers are
    # configured with (JSON: {"python-packages": ["pypi.internal.example"]}).
    egress_presets: dict[str, list[str]] = Field(default_factory=dict)
    # Entries every `egress: allow` sandbox may reach besides its template's (JSON list: host
    # names, *.domains, IP networks, presets).
    egress_allow: list[str] = Field(default_factory=list)
    # Refused connections recorded as events of a sandbox, at most this many a minute (the
    # rest are counted in the metrics only).
    egress_events_per_minute: int = Field(default=20, ge=0, le=10_000)
    # A CA bundle (a PEM file on the Docker host) every workspace trusts in place of its
    # image's, for networks whose TLS is intercepted by a proxy of their own: bound read-only
    # over the image's bundle, with the variables Node and uv read. Empty: the image's own.
    ca_bundle: str = ""

    # The AI gateway (docs/claude.md): Claude Code in sandboxes reaches the model through it,
    # with a token good for its sandbox alone. Its port (0: any free port, for tests; the host
    # firewall admits sandboxes to this port and nothing else of the host).
    gateway_port: int = Field(default=8790, ge=0, le=65535)
    # Networks besides this host's sandboxes whose machines may reach the gateway's and the
    # egress proxy's ports (comma-separated CIDRs): a swarm's nodes (docs/cluster.md).
    gateway_peers: str = Field(default="", pattern=r"^[0-9a-fA-F.:/, ]*$")
    # Address it listens on: every address, since sandboxes reach it on their networks'
    # gateway addresses (the host firewall keeps it from everything but sandboxes and lo).
    gateway_host: str = "0.0.0.0"  # noqa: S104
    # `serve` runs the gateway itself; false where `sandbox-engine gateway` runs it apart
    # (the compose file: on the host's network, holding the upstream credential alone).
    gateway_serve: bool = True
    # Port of a separate gateway's /metrics, on 127.0.0.1 only (0: none).
    gateway_metrics_port: int = Field(default=8791, ge=0, le=65535)
    # Where the gateway forwards to, and the operator's Anthropic Console API key it sends
    # (x-api-key). Never logged, never in an answer, a row, a sandbox or the Pulumi state.
    anthropic_upstream: str = "https://api.anthropic.com"
    anthropic_api_key: SecretStr = SecretStr("")
    # The Docker volume holding the operator's saved Claude Code config (config.json, and for
    # `access: operator-login` templates .credentials.json): read by the engine, never mounted.
    claude_auth_volume: str = Field(
        default="claude-auth", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$"
    )
    # Bytes of one request body the gateway takes (the Messages API's own limit is 32 MB).
    gateway_max_body: int = Field(default=32 * 2**20, ge=2**16, le=2**30)
    # Seconds an answer's stream may stay silent before the gateway gives it up.
    gateway_stream_timeout: float = Field(default=600, ge=5, le=3600)

    @model_validator(mode="after")
    def _swarm_complete(self) -> Settings:
        if self.backend != "swarm":
            return self
        if not self.swarm_manager:
            raise ValueError("SANDBOX_BACKEND=swarm needs SANDBOX_SWARM_MANAGER (tcp://host:port)")
        if self.swarm_tls is None:
            raise ValueError(
                "SANDBOX_BACKEND=swarm needs SANDBOX_SWARM_TLS: a folder with ca.pem, cert.pem"
                " and key.pem (deploy/swarm/certs.sh); node APIs are never reached without TLS"
            )
        missing = [
            f for f in ("ca.pem", "cert.pem", "key.pem") if not (self.swarm_tls / f).is_file()
        ]
        if missing:
            raise ValueError(f"SANDBOX_SWARM_TLS={self.swarm_tls} lacks {', '.join(missing)}")
        if bool(self.swarm_edge) != bool(self.swarm_edge_url):
            raise ValueError(
                "SANDBOX_SWARM_EDGE and SANDBOX_SWARM_EDGE_URL go together: the swarm edge's"
                " container on the manager and its entrypoint's URL (docs/cluster.md)"
            )
        # A sandbox's disk is a loop device of the engine's host: not on the nodes (yet).
        self.disks = False
        return self

    @field_validator("anthropic_upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"anthropic_upstream must be an http(s):// URL, got {value!r}")
        return value

    @field_validator("archive_max_bytes", "disk_limit", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_memory(value) if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in {"postgresql", "postgres"}:
            raise ValueError(f"database_url must be a postgresql:// URL, got scheme {scheme!r}")
        return value

    @field_validator("edge_subnet")
    @classmethod
    def _edge_subnet(cls, value: str) -> str:
        if not value:
            return value
        try:
            network = ipaddress.IPv4Network(value)  # strict: no host bits set
        except ValueError as exc:
            raise ValueError(
                f"edge_subnet must be an IPv4 network like 10.212.0.0/20: {exc}"
            ) from None
        if not network.is_private or network.prefixlen > 28:
            raise ValueError(f"edge_subnet {value} must be a private range of /28 or larger")
        return str(network)

    @field_validator("egress_allow")
    @classmethod
    def _egress_allow(cls, value: list[str]) -> list[str]:
        from engine.model.egress import entry_problem

        for i, entry in enumerate(value):
            found = entry_problem(entry)
            if found:
                raise ValueError(f"egress_allow[{i}]: {found}")
        return [e.strip().lower() for e in value]

    @field_validator("egress_presets")
    @classmethod
    def _egress_presets(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        from engine.model.egress import PRESETS, entry_problem

        for name, hosts in value.items():
            if name not in PRESETS:
                raise ValueError(f"egress_presets: unknown preset {name!r} (known: {PRESETS})")
            for host in hosts:
                found = entry_problem(host)
                if found or host.strip().lower() in PRESETS:
                    raise ValueError(f"egress_presets.{name}: {found or 'a preset in a preset'}")
        return {k: [h.strip().lower() for h in v] for k, v in value.items()}

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        from engine.model.spec import DOMAIN

        if not DOMAIN.match(value):
            raise ValueError(
                f"domain {value!r} is not a lowercase DNS name like sandbox.example.com"
            )
        return value

    @field_validator("pulumi_state_table")
    @classmethod
    def _table_name(cls, value: str) -> str:
        if not value.isidentifier() or not value.isascii():
            raise ValueError("pulumi_state_table must be a plain SQL identifier")
        return value

    @property
    def templates_path(self) -> Path:
        return self.templates_dir or self.project_dir / "templates"

    @property
    def web_path(self) -> Path:
        """The built web UI (``make web``), served at ``/``."""
        return self.web_dir or self.project_dir / "web" / "dist"

    @property
    def engine_urls(self) -> list[str]:
        """Every engine the local edge sends the API to: this one first."""
        extra = [u.rstrip("/") for u in self.edge_engines.split(",") if u]
        return [f"http://127.0.0.1:{self.listen_port}", *extra]

    @property
    def state_path(self) -> Path:
        return self.state_dir or self.project_dir / ".state"

    @property
    def disk_path(self) -> Path:
        return (self.disk_dir or self.state_path / "disks").resolve()

    @property
    def recordings_path(self) -> Path:
        return self.recordings_dir or self.state_path / "recordings"

    @property
    def archives_path(self) -> Path:
        return self.archives_dir or self.state_path / "archives"

    @property
    def toolchain_path(self) -> Path:
        return self.toolchain_bin or self.project_dir / ".toolchain" / "bin"

    @property
    def stack_config_path(self) -> Path:
        """Where stack config files live: Pulumi.yaml's ``stackConfigDir``."""
        return self.project_dir / ".state" / "stacks"

    @property
    def pulumi_home(self) -> Path:
        return self.state_path / "pulumi-home"

    @property
    def passphrase_file(self) -> Path:
        return self.state_path / "pulumi-passphrase"

    def backend_url(self) -> str:
        """The Pulumi backend URL; by default the DIY PostgreSQL backend in our database."""
        if self.pulumi_backend_url is not None:
            return self.pulumi_backend_url.get_secret_value()
        return postgres_backend_url(self.database_url.get_secret_value(), self.pulumi_state_table)


def postgres_backend_url(database_url: str, table: str) -> str:
    """Turn a libpq URL into the URL Pulumi's DIY PostgreSQL backend expects.

    The backend takes ``postgres://`` with an explicit ``sslmode`` and the state table as the
    ``table`` query parameter.
    """
    parts = urlsplit(database_url)
    query = [q for q in parts.query.split("&") if q and not q.startswith("table=")]
    if not any(q.startswith("sslmode=") for q in query):
        query.append("sslmode=disable")
    query.append(f"table={quote(table)}")
    return parts._replace(scheme="postgres", query="&".join(query)).geturl()
