-- Egress rules (engine/egress): every sandbox whose template restricts egress has a row once
-- its workspace runs, naming the workspace's addresses (the proxy knows a sandbox by the
-- address a connection comes from) and the rules it is checked against. The row goes with the
-- sandbox's destroy; the proxy also ignores rows of sandboxes that are not running.

CREATE TABLE egress_rules (
    sandbox_id  text        PRIMARY KEY REFERENCES sandboxes (id) ON DELETE CASCADE,
    addresses   inet[]      NOT NULL,
    rules       jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX egress_rules_addresses ON egress_rules USING gin (addresses);
