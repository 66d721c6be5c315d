-- The warm pool: sandboxes created ahead of any request, with no owner, in state 'pooled'.
-- A create that fits one claims it (owner, TTL from the claim) instead of creating a stack.

ALTER TABLE sandboxes ALTER COLUMN owner_id DROP NOT NULL;  -- NULL: a pool sandbox
ALTER TABLE sandboxes DROP CONSTRAINT sandboxes_state_check;
ALTER TABLE sandboxes ADD CONSTRAINT sandboxes_state_check CHECK (state IN
    ('creating', 'pooled', 'running', 'repairing', 'failed', 'destroying', 'destroyed',
     'expired'));
-- The template file's digest a pool sandbox was made from: after an edit, older pool
-- sandboxes are never claimed, only recycled.
ALTER TABLE sandboxes ADD COLUMN template_digest text;
CREATE INDEX sandboxes_pool ON sandboxes (template, created_at) WHERE owner_id IS NULL;

-- Empty stacks initialised ahead (``pulumi stack init`` costs a CLI run and a key derivation):
-- a cold create takes one instead of initialising its own. ``ready`` once the stack exists;
-- ``worker`` is the engine process initialising it.
CREATE TABLE stack_reserve (
    id         text        PRIMARY KEY,
    ready      boolean     NOT NULL DEFAULT false,
    worker     text,
    created_at timestamptz NOT NULL DEFAULT now()
);
