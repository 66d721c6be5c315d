"""What a hiring team uses beside the terminal (docs/hiring.md):

- ``tasks``: a template's task folder copied into the workspace, made a git repository, its
  ``init`` commands run;
- ``archives``: the workspace packed before a sandbox goes (with a git summary and the AI
  transcript), kept for its retention;
- ``timeline``: a sandbox's activity, from its events, sessions and AI exchanges.
"""
