"""The Pulumi program behind every sandbox stack.

It maps the spec stored in the stack's config to resources. The spec and its resources arrive
with the stacks issue; until then the program only reports which stack it runs for.
"""

import pulumi

pulumi.export("stack", pulumi.get_stack())
