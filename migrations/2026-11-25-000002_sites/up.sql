-- Sites, their uplinks (endpoints), the paths between them, their certificates and the
-- enrollment tokens that create them. Children reference (tenant_id, parent id), so a row can
-- never point at another tenant's parent, whatever the application does.

CREATE TABLE sites (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id         uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name              text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    region            text CHECK (length(region) BETWEEN 1 AND 64),
    role              text NOT NULL DEFAULT 'edge' CHECK (role IN ('edge', 'hub')),
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'active', 'inactive', 'degraded', 'revoked')),
    -- Base64 of a 32-byte Curve25519 public key; set at enrollment.
    wg_public_key     text CHECK (wg_public_key ~ '^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$'),
    overlay_address   inet,
    lan_prefixes      cidr[] NOT NULL DEFAULT '{}',
    listen_port_base  integer NOT NULL DEFAULT 51820 CHECK (listen_port_base BETWEEN 1024 AND 65471),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    enrolled_at       timestamptz,
    last_seen_at      timestamptz,
    UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, id),
    UNIQUE (tenant_id, overlay_address),
    UNIQUE (tenant_id, wg_public_key)
);

-- A site's WAN uplinks (seed: sdwan_endpoints).
CREATE TABLE endpoints (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       uuid NOT NULL,
    site_id         uuid NOT NULL,
    uplink_index    smallint NOT NULL CHECK (uplink_index BETWEEN 0 AND 7),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    address         inet NOT NULL,
    interface_type  text NOT NULL DEFAULT 'other' CHECK (interface_type IN
                    ('fiber', 'cable', 'dsl', 'ethernet', 'mpls', 'lte', 'five_g', 'starlink', 'satellite', 'other')),
    bandwidth_mbps  integer CHECK (bandwidth_mbps > 0),
    cost_per_gb     numeric(12, 6) NOT NULL DEFAULT 0 CHECK (cost_per_gb >= 0),
    metered         boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, site_id) REFERENCES sites (tenant_id, id) ON DELETE CASCADE,
    UNIQUE (site_id, uplink_index),
    UNIQUE (site_id, name),
    UNIQUE (id, site_id),
    UNIQUE (tenant_id, id)
);

-- Paths between sites (seed: sdwan_paths): (local uplink, remote site, remote uplink).
CREATE TABLE paths (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id          uuid NOT NULL,
    src_site_id        uuid NOT NULL,
    dst_site_id        uuid NOT NULL,
    src_endpoint_id    uuid NOT NULL,
    dst_endpoint_id    uuid NOT NULL,
    wg_interface       text CHECK (length(wg_interface) BETWEEN 1 AND 15),
    status             text NOT NULL DEFAULT 'unknown' CHECK (status IN ('up', 'degraded', 'down', 'unknown')),
    score              smallint CHECK (score BETWEEN 0 AND 100),
    status_changed_at  timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (src_site_id <> dst_site_id),
    FOREIGN KEY (tenant_id, src_site_id) REFERENCES sites (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, dst_site_id) REFERENCES sites (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (src_endpoint_id, src_site_id) REFERENCES endpoints (id, site_id) ON DELETE CASCADE,
    FOREIGN KEY (dst_endpoint_id, dst_site_id) REFERENCES endpoints (id, site_id) ON DELETE CASCADE,
    UNIQUE (src_endpoint_id, dst_endpoint_id),
    UNIQUE (tenant_id, id)
);
CREATE INDEX paths_src_site_idx ON paths (tenant_id, src_site_id);
CREATE INDEX paths_dst_site_idx ON paths (tenant_id, dst_site_id);

-- Certificates issued to sites by their tenant's CA. Kept after the site is deleted (site_id
-- becomes NULL) so revoked serials stay on the revocation list.
CREATE TABLE site_certificates (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id          uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    site_id            uuid,
    serial             text NOT NULL CHECK (serial ~ '^[0-9a-f]{2,40}$'),
    subject            text NOT NULL,
    not_before         timestamptz NOT NULL,
    not_after          timestamptz NOT NULL,
    certificate_pem    text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    revoked_at         timestamptz,
    revocation_reason  text,
    CHECK (not_after > not_before),
    CHECK ((revoked_at IS NULL) = (revocation_reason IS NULL)),
    FOREIGN KEY (tenant_id, site_id) REFERENCES sites (tenant_id, id) ON DELETE SET NULL (site_id),
    UNIQUE (tenant_id, serial)
);
CREATE INDEX site_certificates_site_idx ON site_certificates (tenant_id, site_id);

-- Single-use enrollment tokens. The id is the JWT's jti; the token itself is never stored.
-- Redemption is one UPDATE ... WHERE redeemed_at IS NULL AND revoked_at IS NULL AND
-- expires_at > now(), so two concurrent redemptions cannot both succeed.
CREATE TABLE enrollment_tokens (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL,
    site_id      uuid NOT NULL,
    created_by   uuid REFERENCES operators (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    redeemed_at  timestamptz,
    revoked_at   timestamptz,
    CHECK (expires_at > created_at),
    CHECK (redeemed_at IS NULL OR revoked_at IS NULL),
    FOREIGN KEY (tenant_id, site_id) REFERENCES sites (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX enrollment_tokens_site_idx ON enrollment_tokens (tenant_id, site_id);

ALTER TABLE sites ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON sites
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());
ALTER TABLE endpoints ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON endpoints
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());
ALTER TABLE paths ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON paths
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());
ALTER TABLE site_certificates ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON site_certificates
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());
ALTER TABLE enrollment_tokens ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON enrollment_tokens
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());

GRANT SELECT, INSERT, UPDATE, DELETE ON sites, endpoints, paths, enrollment_tokens TO patronus_app;
-- Certificates are issued and revoked, never edited or deleted.
GRANT SELECT, INSERT ON site_certificates TO patronus_app;
GRANT UPDATE (revoked_at, revocation_reason) ON site_certificates TO patronus_app;
