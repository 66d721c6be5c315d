"""The gRPC side: ``pulumi-resource-docker`` serves Pulumi's ResourceProvider protocol.

The engine starts the plugin with its own address as the last argument and reads the port we
listen on from our first line of stdout. Each RPC is translated here, once, into a call on the
resource class for the URN's type token; provider errors become gRPC errors whose message names
the resource and the property.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any, TypeVar

import docker
import docker.tls
import grpc
from google.protobuf import empty_pb2
from pulumi.runtime.proto import plugin_pb2, provider_pb2, provider_pb2_grpc

from stacks.provider.container import Container
from stacks.provider.errors import CheckFailures, ProviderError
from stacks.provider.image import RemoteImage
from stacks.provider.network import Network
from stacks.provider.resource import Context, Resource
from stacks.provider.service import Service
from stacks.provider.volume import Volume
from stacks.provider.wire import from_struct, to_struct

log = logging.getLogger("pulumi-resource-docker")
# Set by the engine when it runs this provider as its shared, long-lived one: the engine's pid.
PARENT_ENV = "SANDBOX_PROVIDER_PARENT"

RESOURCES: dict[str, Resource] = {
    r.token: r for r in (Container(), Network(), Volume(), RemoteImage(), Service())
}
R = TypeVar("R")


def plugin_version() -> str:
    """The version of the ``pulumi_docker`` SDK whose wire names we serve."""
    try:
        return dist_version("pulumi_docker")
    except PackageNotFoundError:
        return "0.0.0"


def _type_and_name(urn: str) -> tuple[str, str]:
    parts = urn.split("::")
    return parts[-2].split("$")[-1], parts[-1]


class DockerProvider(provider_pb2_grpc.ResourceProviderServicer):
    def __init__(self) -> None:
        self._client: docker.DockerClient | None = None
        self._host: str | None = None
        self._cert_path: str | None = None
        self._lock = threading.Lock()

    # --- plumbing --------------------------------------------------------------------------

    def _docker(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                if self._host:
                    tls = _tls(self._cert_path)
                    self._client = docker.DockerClient(
                        base_url=self._host,
                        timeout=120,
                        tls=tls,
                        # A TLS client is made without a request (asking the version would
                        # go through REQUESTS_CA_BUNDLE, not the cluster's CA): Docker 20.10's.
                        version="1.41" if tls else None,
                    )
                    if self._cert_path:  # the cluster's CA, not REQUESTS_CA_BUNDLE's
                        self._client.api.trust_env = False
                else:
                    self._client = docker.from_env(timeout=120)
            return self._client

    def _resource(self, urn: str, context: grpc.ServicerContext) -> tuple[Resource, str]:
        token, name = _type_and_name(urn)
        resource = RESOURCES.get(token)
        if resource is None:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{token} is not served by this provider (it serves: "
                f"{', '.join(sorted(RESOURCES))})",
            )
        return resource, name  # type: ignore[return-value]

    def _call(self, urn: str, context: grpc.ServicerContext, what: str, fn: Callable[[], R]) -> R:
        """Run one operation; a provider error aborts the RPC with a message naming the resource."""
        try:
            return fn()
        except ProviderError as exc:
            token, name = _type_and_name(urn)
            context.abort(grpc.StatusCode.UNKNOWN, f"{token} {name!r}: {what}: {exc}")
        except docker.errors.DockerException as exc:
            token, name = _type_and_name(urn)
            context.abort(grpc.StatusCode.UNKNOWN, f"{token} {name!r}: {what}: Docker: {exc}")
        raise AssertionError("unreachable")

    # --- provider-level RPCs ---------------------------------------------------------------

    def GetPluginInfo(self, request: Any, context: Any) -> plugin_pb2.PluginInfo:
        return plugin_pb2.PluginInfo(version=plugin_version())

    def GetSchema(self, request: Any, context: Any) -> provider_pb2.GetSchemaResponse:
        # The engine asks for a schema only to generate code (import --generate-code, convert).
        return provider_pb2.GetSchemaResponse(
            schema=f'{{"name": "docker", "version": "{plugin_version()}"}}'
        )

    def CheckConfig(self, request: Any, context: Any) -> provider_pb2.CheckResponse:
        return provider_pb2.CheckResponse(inputs=request.news)

    def DiffConfig(self, request: Any, context: Any) -> provider_pb2.DiffResponse:
        return provider_pb2.DiffResponse(changes=provider_pb2.DiffResponse.DIFF_NONE)

    def Handshake(self, request: Any, context: Any) -> Any:
        # Not offered: the engine then negotiates through Configure, as with older providers.
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Handshake is not offered")

    def Attach(self, request: Any, context: Any) -> empty_pb2.Empty:
        """An engine attaching to this running provider (the engine's shared provider,
        ``PULUMI_DEBUG_PROVIDERS``) instead of starting one; we log to stderr, not to it."""
        return empty_pb2.Empty()

    def Configure(self, request: Any, context: Any) -> provider_pb2.ConfigureResponse:
        args = from_struct(request.args) if request.HasField("args") else {}
        host = args.get("host") or request.variables.get("docker:config:host") or None
        # Upstream's certPath: a folder with ca.pem, cert.pem and key.pem (mutual TLS).
        cert_path = args.get("certPath") or request.variables.get("docker:config:certPath")
        with self._lock:
            if self._client is not None and host != self._host:
                # One process serves one Docker host: requests carry no trace of which
                # Configure they follow, so a shared provider cannot switch hosts.
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"this docker provider serves {self._host or 'the default Docker host'};"
                    f" asked for {host or 'the default Docker host'}",
                )
            self._host = host
            self._cert_path = cert_path or None
        # No secrets or resource references in: the engine strips them and re-marks the outputs.
        return provider_pb2.ConfigureResponse(
            acceptSecrets=False, supportsPreview=True, acceptResources=False, acceptOutputs=False
        )

    def GetMapping(self, request: Any, context: Any) -> provider_pb2.GetMappingResponse:
        return provider_pb2.GetMappingResponse(provider="", data=b"")

    def Cancel(self, request: Any, context: Any) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    def Invoke(self, request: Any, context: Any) -> provider_pb2.InvokeResponse:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"function {request.tok} is not served by this provider"
        )
        raise AssertionError("unreachable")

    # --- resource RPCs ---------------------------------------------------------------------

    def Check(self, request: Any, context: Any) -> provider_pb2.CheckResponse:
        resource, name = self._resource(request.urn, context)
        news, olds = from_struct(request.news), from_struct(request.olds)
        autoname = _autoname(name, request)
        try:
            inputs = resource.check(news, olds, autoname=autoname)
        except CheckFailures as exc:
            return provider_pb2.CheckResponse(
                failures=[provider_pb2.CheckFailure(property=p, reason=r) for p, r in exc.failures]
            )
        return provider_pb2.CheckResponse(inputs=to_struct(inputs))

    def Diff(self, request: Any, context: Any) -> provider_pb2.DiffResponse:
        resource, _ = self._resource(request.urn, context)
        state = from_struct(request.olds)
        old_inputs = from_struct(request.old_inputs) if request.HasField("old_inputs") else state
        news = from_struct(request.news)
        for key in request.ignoreChanges:
            if key in old_inputs:
                news[key] = old_inputs[key]
            else:
                news.pop(key, None)
        diff = resource.diff(old_inputs, news, state)
        kinds = provider_pb2.PropertyDiff.Kind
        return provider_pb2.DiffResponse(
            changes=(
                provider_pb2.DiffResponse.DIFF_SOME
                if diff.detailed
                else provider_pb2.DiffResponse.DIFF_NONE
            ),
            replaces=diff.replaces,
            diffs=diff.changed,
            detailedDiff={
                k: provider_pb2.PropertyDiff(kind=kinds.Value(v.value), inputDiff=True)
                for k, v in diff.detailed.items()
            },
            hasDetailedDiff=True,
            deleteBeforeReplace=resource.delete_before_replace and bool(diff.replaces),
        )

    def Create(self, request: Any, context: Any) -> provider_pb2.CreateResponse:
        resource, name = self._resource(request.urn, context)
        inputs = from_struct(request.properties)
        if request.preview:
            return provider_pb2.CreateResponse(
                id="", properties=to_struct(resource.preview_outputs(inputs))
            )
        ctx = Context(self._docker(), name)
        id_, outputs = self._call(
            request.urn, context, "create", lambda: resource.create(ctx, inputs)
        )
        return provider_pb2.CreateResponse(id=id_, properties=to_struct(outputs))

    def Read(self, request: Any, context: Any) -> provider_pb2.ReadResponse:
        resource, name = self._resource(request.urn, context)
        state, inputs = from_struct(request.properties), from_struct(request.inputs)
        ctx = Context(self._docker(), name)
        found = self._call(
            request.urn, context, "read", lambda: resource.read(ctx, request.id, state, inputs)
        )
        if found is None:
            return provider_pb2.ReadResponse(id="")  # gone: the engine drops it from the state
        outputs, new_inputs = found
        return provider_pb2.ReadResponse(
            id=request.id, properties=to_struct(outputs), inputs=to_struct(new_inputs)
        )

    def Update(self, request: Any, context: Any) -> provider_pb2.UpdateResponse:
        resource, name = self._resource(request.urn, context)
        olds, news = from_struct(request.olds), from_struct(request.news)
        if request.preview:
            merged = {**olds, **news}
            return provider_pb2.UpdateResponse(properties=to_struct(merged))
        ctx = Context(self._docker(), name)
        outputs = self._call(
            request.urn, context, "update", lambda: resource.update(ctx, request.id, olds, news)
        )
        return provider_pb2.UpdateResponse(properties=to_struct(outputs))

    def Delete(self, request: Any, context: Any) -> empty_pb2.Empty:
        resource, name = self._resource(request.urn, context)
        state = from_struct(request.properties)
        ctx = Context(self._docker(), name)
        self._call(request.urn, context, "delete", lambda: resource.delete(ctx, request.id, state))
        return empty_pb2.Empty()


def _tls(cert_path: str | None) -> docker.tls.TLSConfig | bool:
    """Mutual TLS with the certificates of ``cert_path`` (the Docker host's CA checked)."""
    if not cert_path:
        return False
    return docker.tls.TLSConfig(
        client_cert=(f"{cert_path}/cert.pem", f"{cert_path}/key.pem"),
        ca_cert=f"{cert_path}/ca.pem",
        verify=True,
    )


def _autoname(name: str, request: Any) -> str:
    """``<name>-<7 hex>``, stable for one resource across previews (seeded by the engine)."""
    if request.HasField("autonaming") and request.autonaming.proposed_name:
        return str(request.autonaming.proposed_name)
    seed = bytes(request.randomSeed) or os.urandom(8)
    return f"{name}-{hashlib.sha256(seed).hexdigest()[:7]}"


def serve() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    provider_pb2_grpc.add_ResourceProviderServicer_to_server(DockerProvider(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # The engine reads the port from our first line of output.
    print(port, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = os.environ.get(PARENT_ENV)
    if parent:
        # The engine's shared provider outlives single runs: it ends with the engine, even
        # one killed with no chance to stop it (it is then re-parented).
        threading.Thread(target=_watch_parent, args=(int(parent), stop), daemon=True).start()
    stop.wait()
    server.stop(grace=5).wait()


def _watch_parent(pid: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        if os.getppid() != pid:
            stop.set()


def main() -> None:
    serve()


if __name__ == "__main__":
    main()
