-- Metrics ingest: the time of the measurement a path's current status came from, and one-minute
-- rollups of path_metrics that the history API reads for steps of a minute or more.

-- The controller updates paths.status/score from the newest sample only; a redelivered or late
-- batch with older samples leaves them alone.
ALTER TABLE paths ADD COLUMN metrics_at timestamptz;

-- One row per path and UTC minute. Sums and counts rather than averages, so rows merge exactly
-- (two replicas, or two batches, adding samples of the same minute) and any wider bucket is a
-- sum of rows.
CREATE TABLE path_metrics_1m (
    tenant_id          uuid NOT NULL,
    path_id            uuid NOT NULL,
    minute             timestamptz NOT NULL,
    samples            integer NOT NULL CHECK (samples > 0),
    latency_sum        double precision NOT NULL CHECK (latency_sum >= 0),
    latency_min        real NOT NULL,
    latency_max        real NOT NULL,
    jitter_sum         double precision NOT NULL CHECK (jitter_sum >= 0),
    packet_loss_sum    double precision NOT NULL CHECK (packet_loss_sum >= 0),
    packet_loss_max    real NOT NULL,
    -- Bandwidth and MTU are optional in a sample: their own count.
    bandwidth_sum      double precision NOT NULL DEFAULT 0,
    bandwidth_samples  integer NOT NULL DEFAULT 0 CHECK (bandwidth_samples BETWEEN 0 AND samples),
    mtu_min            integer,
    score_sum          bigint NOT NULL,
    score_min          smallint NOT NULL,
    down_samples       integer NOT NULL DEFAULT 0 CHECK (down_samples BETWEEN 0 AND samples),
    probes_sent        bigint NOT NULL DEFAULT 0,
    probes_lost        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (path_id, minute),
    FOREIGN KEY (tenant_id, path_id) REFERENCES paths (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX path_metrics_1m_tenant_minute_idx ON path_metrics_1m (tenant_id, minute);

-- Like every table since auth_intents: RLS for every role but the owner (NO FORCE).
ALTER TABLE path_metrics_1m ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON path_metrics_1m
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());
-- UPDATE for the merge below, DELETE for retention (run per tenant, under its scope).
GRANT SELECT, INSERT, UPDATE, DELETE ON path_metrics_1m TO patronus_app;

-- Filled on write: every INSERT into path_metrics adds the rows it actually inserted (a
-- conflicting redelivery inserts nothing, so adds nothing) to their minutes, in one statement
-- per INSERT. Runs as the inserting role, so row-level security applies to the rollup too.
-- Rows are merged in key order so concurrent writers lock them in the same order.
CREATE FUNCTION patronus_path_metrics_rollup() RETURNS trigger
    LANGUAGE plpgsql SET search_path = public, pg_temp
AS $$
BEGIN
    INSERT INTO path_metrics_1m AS r (
        tenant_id, path_id, minute, samples, latency_sum, latency_min, latency_max, jitter_sum,
        packet_loss_sum, packet_loss_max, bandwidth_sum, bandwidth_samples, mtu_min, score_sum,
        score_min, down_samples, probes_sent, probes_lost)
    SELECT tenant_id, path_id, date_bin('1 minute', measured_at, timestamptz '1970-01-01 00:00:00+00'),
           count(*), sum(latency_ms), min(latency_ms), max(latency_ms), sum(jitter_ms),
           sum(packet_loss_pct), max(packet_loss_pct), coalesce(sum(bandwidth_mbps), 0),
           count(bandwidth_mbps), min(mtu), sum(score), min(score),
           count(*) FILTER (WHERE status = 'down'), sum(probes_sent), sum(probes_lost)
    FROM new_rows
    GROUP BY 1, 2, 3
    ORDER BY 2, 3
    ON CONFLICT (path_id, minute) DO UPDATE SET
        samples = r.samples + EXCLUDED.samples,
        latency_sum = r.latency_sum + EXCLUDED.latency_sum,
        latency_min = least(r.latency_min, EXCLUDED.latency_min),
        latency_max = greatest(r.latency_max, EXCLUDED.latency_max),
        jitter_sum = r.jitter_sum + EXCLUDED.jitter_sum,
        packet_loss_sum = r.packet_loss_sum + EXCLUDED.packet_loss_sum,
        packet_loss_max = greatest(r.packet_loss_max, EXCLUDED.packet_loss_max),
        bandwidth_sum = r.bandwidth_sum + EXCLUDED.bandwidth_sum,
        bandwidth_samples = r.bandwidth_samples + EXCLUDED.bandwidth_samples,
        mtu_min = least(r.mtu_min, EXCLUDED.mtu_min),
        score_sum = r.score_sum + EXCLUDED.score_sum,
        score_min = least(r.score_min, EXCLUDED.score_min),
        down_samples = r.down_samples + EXCLUDED.down_samples,
        probes_sent = r.probes_sent + EXCLUDED.probes_sent,
        probes_lost = r.probes_lost + EXCLUDED.probes_lost;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION patronus_path_metrics_rollup() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION patronus_path_metrics_rollup() TO patronus_app;

CREATE TRIGGER path_metrics_rollup
    AFTER INSERT ON path_metrics
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION patronus_path_metrics_rollup();
