"""Claude for candidates without credentials in any sandbox: the AI gateway and what it keeps.

- ``gateway``: the Messages API passthrough on a listener of its own; the operator's credential
  is added there and never leaves the engine.
- ``stream``: reading an answer as it streams through (usage, the assembled content).
- ``budget``: what an exchange bills and whether a request may start.
- ``transcript``: each exchange's new messages, and the conversation as a reviewer reads it.
- ``store``: tokens, budgets and exchanges in PostgreSQL.
- ``workspace``: Claude Code's configuration inside a sandbox (managed settings, first screen).
"""
