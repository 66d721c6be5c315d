-- Expiry warnings, repairs of sandboxes changed behind the engine's back, the worker that owns a
-- sandbox's in-flight operation, and this engine's identity on the Docker objects it makes.

ALTER TABLE sandboxes DROP CONSTRAINT sandboxes_state_check;
ALTER TABLE sandboxes ADD CONSTRAINT sandboxes_state_check CHECK (state IN
    ('creating', 'running', 'repairing', 'failed', 'destroying', 'destroyed', 'expired'));

-- The engine process running the sandbox's current operation (creating, repairing,
-- destroying). It holds a session advisory lock on this id while it lives: a row whose worker
-- holds no lock was left by a process that died, and is settled by another.
ALTER TABLE sandboxes ADD COLUMN worker text;
-- The expiry an expiry warning was sent for: extending the TTL moves expires_at away from it,
-- which cancels that warning (a new one is sent before the new expiry).
ALTER TABLE sandboxes ADD COLUMN warned_for timestamptz;
CREATE INDEX sandboxes_in_flight ON sandboxes (state)
    WHERE state IN ('creating', 'repairing', 'destroying');

-- One row: this engine's identity. Every Docker object of its sandboxes carries it as a label,
-- so the orphan sweep removes only its own objects when several engines (or test databases)
-- share one dockerd.
CREATE TABLE engine_instance (
    id         text        PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    singleton  boolean     NOT NULL DEFAULT true UNIQUE CHECK (singleton)
);
INSERT INTO engine_instance (id) VALUES (substr(replace(gen_random_uuid()::text, '-', ''), 1, 12));
