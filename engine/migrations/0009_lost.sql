-- A sandbox whose node is lost (a swarm node down: docs/cluster.md): state 'lost' until its node
-- returns (it is started there again, with its volumes) or it is destroyed.

ALTER TABLE sandboxes DROP CONSTRAINT sandboxes_state_check;
ALTER TABLE sandboxes ADD CONSTRAINT sandboxes_state_check CHECK (state IN
    ('creating', 'pooled', 'running', 'repairing', 'lost', 'failed', 'destroying', 'destroyed',
     'expired'));
