"""What a sandbox is, as pure data (no I/O but reading a template file).

- ``schema``: the template file's fields, declared once as typed models;
- ``templates``: loading a template file strictly, every problem with its file, path and line;
- ``egress``: egress rules (the entries a template's ``network`` section may list, the check
  the egress proxy makes);
- ``spec``: a template and a request decided into a ``SandboxSpec`` (names, labels, limits,
  Traefik rules), which the Pulumi program in ``stacks/`` declares.

This is all ``stacks/`` takes from the engine.
"""
