"""The Pulumi project's program package (``Pulumi.yaml``: ``main: stacks/``): the program
behind every sandbox stack, which the plain CLI runs through ``__main__.py`` and the engine
runs inline (engine/sandboxes/runs.py finds it here, as the project's ``main``), and the
engine's provider for the ``docker`` package (``stacks/provider``). It imports nothing of the
engine but its pure model (engine/model: templates and the spec, with the units and
errors they use)."""

from stacks.program import program

__all__ = ["program"]
