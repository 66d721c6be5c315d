"""Entry point of the Pulumi project (``Pulumi.yaml``: runtime python, main ``stacks/``): the
plain ``pulumi`` CLI runs this file; the program itself is ``stacks.program``."""

from stacks.program import program

program()
