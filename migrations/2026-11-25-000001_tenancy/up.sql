-- Tenancy: MSPs own tenants; operators belong to an MSP (msp_admin) or one tenant; API tokens
-- belong to a tenant; the audit log records every change.
--
-- Row-level security is keyed on two per-transaction settings that the application sets with
-- set_config(..., true) before its first query:
--   patronus.tenant_id  the tenant the request acts for
--   patronus.msp_id     the MSP, for MSP-wide reads (tenant list, MSP operators)
-- The application connects as patronus_app, which is not the owner of any table and has
-- NOBYPASSRLS; every table also has FORCE ROW LEVEL SECURITY so even the owner is filtered.

REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO patronus_app;

CREATE FUNCTION patronus_current_tenant() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT nullif(current_setting('patronus.tenant_id', true), '')::uuid $$;

CREATE FUNCTION patronus_current_msp() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT nullif(current_setting('patronus.msp_id', true), '')::uuid $$;

CREATE TABLE msps (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tenants (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    msp_id           uuid NOT NULL REFERENCES msps (id) ON DELETE RESTRICT,
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    slug             text NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    -- Overlay addresses of the tenant's sites are allocated from this network.
    overlay_network  cidr NOT NULL DEFAULT '100.64.0.0/16',
    -- Topology settings (mode, hubs, max_peers...), validated by the controller.
    topology         jsonb NOT NULL DEFAULT '{"mode": "full_mesh"}' CHECK (jsonb_typeof(topology) = 'object'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (msp_id, slug),
    UNIQUE (id, msp_id)
);

CREATE TABLE operators (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    msp_id         uuid NOT NULL REFERENCES msps (id) ON DELETE CASCADE,
    tenant_id      uuid,
    email          text NOT NULL CHECK (email ~ '^[^@\s]+@[^@\s]+$' AND length(email) <= 254),
    display_name   text NOT NULL DEFAULT '' CHECK (length(display_name) <= 128),
    password_hash  text NOT NULL,
    role           text NOT NULL CHECK (role IN ('msp_admin', 'tenant_admin', 'tenant_viewer')),
    disabled_at    timestamptz,
    last_login_at  timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- An msp_admin has no tenant; everyone else has exactly one, of their own MSP.
    CHECK ((role = 'msp_admin') = (tenant_id IS NULL)),
    FOREIGN KEY (tenant_id, msp_id) REFERENCES tenants (id, msp_id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX operators_email_key ON operators (lower(email));
CREATE INDEX operators_tenant_idx ON operators (tenant_id);

CREATE TABLE api_tokens (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    -- SHA-256 of the secret; the secret itself is shown once and never stored.
    token_hash    bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    role          text NOT NULL CHECK (role IN ('tenant_admin', 'tenant_viewer')),
    created_by    uuid REFERENCES operators (id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    UNIQUE (tenant_id, name)
);

-- Append-only: the application may insert and read, never update or delete.
-- tenant_id has no foreign key on purpose: the trail outlives what it describes.
CREATE TABLE audit_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    msp_id       uuid NOT NULL REFERENCES msps (id) ON DELETE CASCADE,
    tenant_id    uuid,
    at           timestamptz NOT NULL DEFAULT now(),
    actor_kind   text NOT NULL CHECK (actor_kind IN ('operator', 'api_token', 'site', 'system')),
    actor_id     uuid,
    actor_label  text NOT NULL,
    action       text NOT NULL CHECK (length(action) BETWEEN 1 AND 64),
    target_kind  text NOT NULL,
    target_id    text,
    detail       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    request_id   text,
    source_ip    inet
);
CREATE INDEX audit_log_tenant_at_idx ON audit_log (tenant_id, at DESC);
CREATE INDEX audit_log_msp_at_idx ON audit_log (msp_id, at DESC);

ALTER TABLE msps ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY msp_isolation ON msps
    USING (id = patronus_current_msp())
    WITH CHECK (id = patronus_current_msp());

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants
    USING (id = patronus_current_tenant() OR msp_id = patronus_current_msp())
    WITH CHECK (id = patronus_current_tenant() OR msp_id = patronus_current_msp());

ALTER TABLE operators ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON operators
    USING (tenant_id = patronus_current_tenant() OR msp_id = patronus_current_msp())
    WITH CHECK (tenant_id = patronus_current_tenant() OR msp_id = patronus_current_msp());

ALTER TABLE api_tokens ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_tokens
    USING (tenant_id = patronus_current_tenant())
    WITH CHECK (tenant_id = patronus_current_tenant());

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_log
    USING (tenant_id = patronus_current_tenant() OR msp_id = patronus_current_msp())
    WITH CHECK (tenant_id = patronus_current_tenant() OR msp_id = patronus_current_msp());

GRANT SELECT, INSERT, UPDATE ON msps TO patronus_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON tenants, operators, api_tokens TO patronus_app;
GRANT SELECT, INSERT ON audit_log TO patronus_app;
