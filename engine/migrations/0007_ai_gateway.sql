-- The AI gateway: a token per sandbox, its budget and usage, and every exchange (the
-- candidate's AI transcript). No foreign keys to sandboxes: usage and exchanges outlive the
-- sandbox's row like recordings (pruned after recording_retention), keeping their owner to
-- decide who may read them.

CREATE TABLE ai_tokens (
    sandbox_id  text        PRIMARY KEY,
    token_hash  bytea       NOT NULL UNIQUE,  -- SHA-256 of the token; the token is in the sandbox only
    -- The workspace's own addresses: the only peers the token is good from.
    addresses   inet[]      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE ai_usage (
    sandbox_id     text        PRIMARY KEY,
    owner_id       bigint      REFERENCES api_clients (id),
    template       text        NOT NULL,
    model          text,        -- the template's pinned model; NULL: any
    max_tokens     int         NOT NULL,  -- the cap on one request's output
    budget_tokens  bigint      NOT NULL,
    used_tokens    bigint      NOT NULL DEFAULT 0,  -- billed (engine/ai/budget.py)
    -- Held by requests in flight (their reservations), given back as each one ends.
    reserved_tokens bigint     NOT NULL DEFAULT 0,
    input_tokens   bigint      NOT NULL DEFAULT 0,
    output_tokens  bigint      NOT NULL DEFAULT 0,
    cache_creation_tokens bigint NOT NULL DEFAULT 0,
    cache_read_tokens     bigint NOT NULL DEFAULT 0,
    requests       int         NOT NULL DEFAULT 0,
    refused        int         NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ai_usage_created ON ai_usage (created_at);

CREATE TABLE ai_exchanges (
    id            bigserial   PRIMARY KEY,
    sandbox_id    text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('messages', 'count_tokens')),
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,   -- NULL while in flight
    reserved      bigint      NOT NULL DEFAULT 0,  -- held against the budget while in flight
    session_id    text,          -- Claude Code's session (X-Claude-Code-Session-Id)
    agent_id      text,          -- a subagent's id (x-claude-code-agent-id); NULL: main thread
    side          boolean     NOT NULL DEFAULT false,  -- a side call (a title, a summary)
    model         text,
    stream        boolean     NOT NULL DEFAULT false,
    status        int,           -- the answer's HTTP status
    refused       text,          -- why the gateway refused it (budget, model, ...), or NULL
    usage         jsonb,
    billed        bigint      NOT NULL DEFAULT 0,
    -- The request's history: how many messages, digests of its first and last (the next
    -- request's delta is computed against them), and the messages this request added.
    message_count int         NOT NULL DEFAULT 0,
    first_digest  text,
    last_digest   text,
    first_message int         NOT NULL DEFAULT 0,  -- index of messages[0] in the history
    messages      jsonb,
    answer        jsonb,         -- the assembled answer: text, thinking, tool_use with input
    error         text,
    first_byte_ms real,          -- the gateway's own time to the answer's first byte
    upstream_ms   real           -- the upstream's time to its first byte, as the gateway saw it
);
CREATE INDEX ai_exchanges_sandbox ON ai_exchanges (sandbox_id, id);
CREATE INDEX ai_exchanges_open ON ai_exchanges (sandbox_id) WHERE finished_at IS NULL;
CREATE INDEX ai_exchanges_conversation ON ai_exchanges (sandbox_id, session_id, agent_id, id);
CREATE INDEX ai_exchanges_started ON ai_exchanges (started_at);
