-- Path metrics history (seed: sdwan_path_metrics), range-partitioned by day (UTC) so that
-- retention is a DROP of whole partitions, never a DELETE over millions of rows.
-- Rows are immutable: the application inserts and reads.

CREATE TABLE path_metrics (
    tenant_id        uuid NOT NULL,
    path_id          uuid NOT NULL,
    measured_at      timestamptz NOT NULL,
    latency_ms       real NOT NULL CHECK (latency_ms >= 0),
    jitter_ms        real NOT NULL CHECK (jitter_ms >= 0),
    packet_loss_pct  real NOT NULL CHECK (packet_loss_pct BETWEEN 0 AND 100),
    bandwidth_mbps   real CHECK (bandwidth_mbps >= 0),
    mtu              integer CHECK (mtu BETWEEN 68 AND 65535),
    score            smallint NOT NULL CHECK (score BETWEEN 0 AND 100),
    status           text NOT NULL CHECK (status IN ('up', 'degraded', 'down', 'unknown')),
    probes_sent      integer NOT NULL DEFAULT 0 CHECK (probes_sent >= 0),
    probes_lost      integer NOT NULL DEFAULT 0 CHECK (probes_lost BETWEEN 0 AND probes_sent),
    PRIMARY KEY (path_id, measured_at),
    FOREIGN KEY (tenant_id, path_id) REFERENCES paths (tenant_id, id) ON DELETE CASCADE
) PARTITION BY RANGE (measured_at);
CREATE INDEX path_metrics_tenant_at_idx ON path_metrics (tenant_id, measured_at);

ALTER TABLE path_metrics ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON path_metrics
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());
GRANT SELECT, INSERT ON path_metrics TO patronus_app;

-- Create the daily partitions [from_day, from_day + days) that do not exist yet; returns how
-- many it created. Each partition gets the same row-level security as the parent, so even a
-- query that names a partition directly is filtered (the application role has no grant on
-- partitions at all; it goes through path_metrics).
CREATE FUNCTION patronus_ensure_path_metrics_partitions(from_day date, days integer)
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    day date;
    part text;
    created integer := 0;
BEGIN
    IF days IS NULL OR days < 1 OR days > 366 THEN
        RAISE EXCEPTION 'days must be between 1 and 366, got %', days;
    END IF;
    FOR i IN 0 .. days - 1 LOOP
        day := from_day + i;
        part := 'path_metrics_' || to_char(day, 'YYYYMMDD');
        IF to_regclass(part) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF path_metrics FOR VALUES FROM (%L) TO (%L)',
                part, (day::timestamp AT TIME ZONE 'UTC'), ((day + 1)::timestamp AT TIME ZONE 'UTC'));
            EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY', part);
            EXECUTE format(
                'CREATE POLICY tenant_isolation ON %I USING (tenant_id = patronus_current_tenant()) '
                'WITH CHECK (tenant_id = patronus_current_tenant())', part);
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

-- Retention: drop every daily partition that ends on or before `cutoff`; returns how many.
CREATE FUNCTION patronus_drop_path_metrics_partitions_before(cutoff date)
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'path_metrics'::regclass
          AND c.relname ~ '^path_metrics_[0-9]{8}$'
          AND to_date(substr(c.relname, 14), 'YYYYMMDD') + 1 <= cutoff
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$$;

REVOKE ALL ON FUNCTION patronus_ensure_path_metrics_partitions(date, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION patronus_drop_path_metrics_partitions_before(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION patronus_ensure_path_metrics_partitions(date, integer) TO patronus_app;
GRANT EXECUTE ON FUNCTION patronus_drop_path_metrics_partitions_before(date) TO patronus_app;

-- Yesterday through a week ahead; the controller keeps creating partitions ahead of time.
SELECT patronus_ensure_path_metrics_partitions(((now() AT TIME ZONE 'UTC')::date) - 1, 9);
