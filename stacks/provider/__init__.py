"""The engine's Pulumi resource provider for the ``docker`` package.

It serves the type tokens and camelCase wire names of pulumi-docker for the resources sandboxes
use (Network, Volume, Container, RemoteImage), so programs written with the ``pulumi_docker``
SDK run unchanged here and where the upstream provider is installed. The plugin executable is
``pulumi-resource-docker`` (a console script of this package, on the engine's PATH).
"""
