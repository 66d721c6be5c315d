"""The machine the engine runs on, and the components it sets up there:

- ``images``: the workspace and service images, built from Debian without a registry;
- ``edge``: Traefik and the edge network that published ports are routed on;
- ``firewall``: the host rules that keep sandboxes off the host and each other;
- ``toolenv``: the Pulumi CLI's environment (toolchain, state backend, provider);
- ``doctor``: ``make doctor``'s checks, each with its fix.
"""
