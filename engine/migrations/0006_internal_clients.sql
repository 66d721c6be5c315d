-- Identities the engine uses itself (the local CLI's admin): nobody holds their keys, so they
-- do not count as an admin someone can sign in with when `serve` decides whether to make the
-- first admin key.
ALTER TABLE api_clients ADD COLUMN internal boolean NOT NULL DEFAULT false;
UPDATE api_clients SET internal = true WHERE name = 'local cli' AND role = 'admin';
