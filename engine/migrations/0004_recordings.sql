-- Terminal session recordings: one row per recorded session, its asciicast file in the
-- recordings folder (<recordings_dir>/<sandbox_id>/<id>.cast).

CREATE TABLE recordings (
    id         text        PRIMARY KEY,
    -- No foreign key: a recording outlives its sandbox's row (pruned after the retention
    -- period); it is deleted after its own (recording_retention).
    sandbox_id text        NOT NULL,
    -- The sandbox's owner when it was recorded: who (besides admins) may read it.
    owner_id   bigint      REFERENCES api_clients (id),
    -- Who opened the session: a candidate's token, or a member's or an admin's key (its name).
    role       text        NOT NULL CHECK (role IN ('candidate', 'member', 'admin')),
    client     text        NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at   timestamptz,
    width      int         NOT NULL,
    height     int         NOT NULL,
    bytes      bigint      NOT NULL DEFAULT 0,  -- the file's size, once the session ended
    has_input  boolean     NOT NULL
);
CREATE INDEX recordings_sandbox ON recordings (sandbox_id, started_at);
CREATE INDEX recordings_started ON recordings (started_at);
