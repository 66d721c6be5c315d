-- Workspace archives, made before a sandbox is destroyed (expired, deleted) and on submit. No
-- foreign key to sandboxes: an archive outlives its sandbox's row (pruned after retention_days),
-- so it keeps its owner to decide who may read it.
CREATE TABLE archives (
    id         bigserial   PRIMARY KEY,
    sandbox_id text        NOT NULL,
    owner_id   bigint      REFERENCES api_clients (id),
    reason     text        NOT NULL CHECK (reason IN ('expired', 'deleted', 'submitted')),
    created_at timestamptz NOT NULL DEFAULT now(),
    file       text,        -- its name in the archives folder; NULL when the archive failed
    bytes      bigint      NOT NULL DEFAULT 0,   -- of the .tar.gz
    files      integer     NOT NULL DEFAULT 0,   -- regular files in it
    sha256     text,
    git        text,        -- git log and diff of a task repository found in it, or NULL
    notes      text,        -- what was left out on purpose, and paths that did not exist
    error      text,        -- why the archive failed (after every attempt), or NULL
    expires_at timestamptz NOT NULL
);
CREATE INDEX archives_sandbox ON archives (sandbox_id, id);
CREATE INDEX archives_expiry ON archives (expires_at);

-- One submit per sandbox: the first claims the row, a second (even at once) waits for its
-- report and returns it.
CREATE TABLE submissions (
    sandbox_id text        PRIMARY KEY,
    by_whom    text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    report     jsonb       -- NULL while the first submit is still archiving
);
