-- Routes kept in PostgreSQL for the changewire gateway service (docs/gateway.md).
-- Each row is one Route: `spec` holds exactly what a Route custom resource's
-- spec holds (schemas/crds/route.yaml), so a route can move between a cluster
-- and this table unchanged. Publish the table to changewire's producer (add it
-- to its publication and `tables`) and subscribe the gateway service to its
-- topic. A row's LSN orders its changes: a replayed older change is a no-op.
CREATE TABLE IF NOT EXISTS gateway_routes (
    namespace  text        NOT NULL DEFAULT 'default',
    name       text        NOT NULL CHECK (name ~ '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'),
    spec       jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);

-- The producer needs the old key on deletes; the primary key gives it.
ALTER TABLE gateway_routes REPLICA IDENTITY DEFAULT;
