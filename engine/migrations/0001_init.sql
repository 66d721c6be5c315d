-- API clients, sandboxes and their events.

CREATE TABLE api_clients (
    id           bigserial PRIMARY KEY,
    name         text        NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    role         text        NOT NULL CHECK (role IN ('admin', 'member')),
    key_hash     bytea       NOT NULL UNIQUE,   -- sha256 of the key; the key itself is never stored
    key_prefix   text        NOT NULL,          -- its first characters, to recognise it in lists
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

CREATE TABLE sandboxes (
    id              text        PRIMARY KEY,
    owner_id        bigint      NOT NULL REFERENCES api_clients (id),
    template        text        NOT NULL,
    state           text        NOT NULL CHECK (state IN
                        ('creating', 'running', 'failed', 'destroying', 'destroyed', 'expired')),
    reason          text,       -- why it was destroyed: request | ttl | orphaned
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    destroyed_at    timestamptz,
    spec            jsonb,
    outputs         jsonb,
    error           text,
    metadata        jsonb       NOT NULL DEFAULT '{}',  -- the client's own labels, returned as given
    idempotency_key text,
    UNIQUE (owner_id, idempotency_key)
);
CREATE INDEX sandboxes_owner_state ON sandboxes (owner_id, state);
CREATE INDEX sandboxes_live_expiry ON sandboxes (expires_at) WHERE destroyed_at IS NULL;

CREATE TABLE sandbox_events (
    id         bigserial   PRIMARY KEY,
    sandbox_id text        NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    at         timestamptz NOT NULL DEFAULT now(),
    kind       text        NOT NULL,
    message    text        NOT NULL DEFAULT '',
    data       jsonb
);
CREATE INDEX sandbox_events_sandbox ON sandbox_events (sandbox_id, id);
