-- Policies (routing, QoS, security, cost) and the flows edges report.

CREATE TABLE policies (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    kind        text NOT NULL CHECK (kind IN ('routing', 'qos', 'security', 'cost')),
    -- Higher wins among matching policies of one kind.
    priority    integer NOT NULL DEFAULT 100 CHECK (priority BETWEEN 0 AND 65535),
    enabled     boolean NOT NULL DEFAULT true,
    -- The policy body as patronus-proto defines it for `kind`, validated by the controller.
    spec        jsonb NOT NULL CHECK (jsonb_typeof(spec) = 'object'),
    -- Sites it applies to; NULL means every site of the tenant.
    site_ids    uuid[],
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, id)
);

-- Flows reported by edges (seed: sdwan_flows).
CREATE TABLE flows (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       uuid NOT NULL,
    site_id         uuid NOT NULL,
    src_ip          inet NOT NULL,
    dst_ip          inet NOT NULL,
    src_port        integer NOT NULL CHECK (src_port BETWEEN 0 AND 65535),
    dst_port        integer NOT NULL CHECK (dst_port BETWEEN 0 AND 65535),
    protocol        smallint NOT NULL CHECK (protocol BETWEEN 0 AND 255),
    app_class       text NOT NULL,
    policy_id       uuid,
    path_id         uuid,
    started_at      timestamptz NOT NULL,
    last_packet_at  timestamptz NOT NULL,
    bytes_tx        bigint NOT NULL DEFAULT 0 CHECK (bytes_tx >= 0),
    bytes_rx        bigint NOT NULL DEFAULT 0 CHECK (bytes_rx >= 0),
    packets_tx      bigint NOT NULL DEFAULT 0 CHECK (packets_tx >= 0),
    packets_rx      bigint NOT NULL DEFAULT 0 CHECK (packets_rx >= 0),
    reported_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (last_packet_at >= started_at),
    CHECK (family(src_ip) = family(dst_ip)),
    FOREIGN KEY (tenant_id, site_id) REFERENCES sites (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, policy_id) REFERENCES policies (tenant_id, id) ON DELETE SET NULL (policy_id),
    FOREIGN KEY (tenant_id, path_id) REFERENCES paths (tenant_id, id) ON DELETE SET NULL (path_id),
    UNIQUE (site_id, src_ip, dst_ip, src_port, dst_port, protocol, started_at)
);
CREATE INDEX flows_tenant_last_idx ON flows (tenant_id, last_packet_at DESC);

ALTER TABLE policies ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON policies
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());
ALTER TABLE flows ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON flows
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());

GRANT SELECT, INSERT, UPDATE, DELETE ON policies, flows TO patronus_app;
