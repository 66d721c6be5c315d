"""Egress rules (docs/security.md, Egress): what a sandbox may reach outside its own network.

- the rules themselves are pure data, in ``engine/model/egress.py``: the entries a template's
  ``network`` section and the operator's settings may list, and the check;
- ``presets``: the named lists (``python-packages``…), read from what the package managers in
  the sandbox's image are configured with.
- ``store``: each restricted sandbox's addresses and list, where the proxy finds them.
- ``proxy``: the engine's egress proxy, the one way out of a restricted sandbox's network.
"""
