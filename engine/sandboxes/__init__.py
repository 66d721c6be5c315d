"""The sandbox lifecycle: a facade (``service.SandboxService``) that the API and the CLI call,
over parts that each do one thing, their dependencies passed in:

- ``jobs``: background jobs, their events and progress, the engine's stop;
- ``creates``: create requests, quotas and rate limits, claims of the warm pool;
- ``lifecycle``: destroy, extend, submit, expiry warnings;
- ``pool``: the warm pool and the stack reserve (refills, recycling);
- ``recovery``: reconciliation after a restart, drift checks, repairs, the orphan sweep;
- ``reaper``: the periodic pass that expires sandboxes and runs the rest;
- ``stacks``, ``runs``, ``stack_config``, ``previews``, ``pulumi_cli``: one Pulumi stack per
  sandbox, over the Automation API and the CLI.
"""
