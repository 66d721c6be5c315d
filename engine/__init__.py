"""Sandbox Engine: disposable Linux workspaces, one Pulumi stack each (docs/architecture.md).

The shared kernel sits at the top — ``settings``, ``store`` (the database's rows), ``errors``,
``units``, ``tokens``, ``migrate`` and ``workers`` — and every subpackage may use it:

- ``model``: what a sandbox is, as pure data (the template schema, the spec of its objects);
- ``sandboxes``: the lifecycle (creates, destroys, the warm pool, recovery) over Pulumi stacks;
- ``backend``: the seam to what runs the containers, for everything Pulumi does not do;
- ``terminal``: terminal sessions and their recordings;
- ``hiring``: tasks, archives and the activity timeline a reviewer reads;
- ``ai``: Claude through the AI gateway, with credentials that never enter a sandbox;
- ``host``: the machine the engine runs on (images, Traefik, firewall, toolchain, doctor).

``cli`` is the composition root: ``sandbox-engine serve`` puts the HTTP layer (``api/``) on top.
"""
