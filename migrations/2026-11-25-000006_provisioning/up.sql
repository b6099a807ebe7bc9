-- Provisioning: each tenant's certificate authority and the NATS users issued to sites.

-- One CA per tenant, created on first use. The private key is sealed (ChaCha20-Poly1305, key
-- from the controller's configuration, the tenant id as associated data), so a database dump
-- alone signs nothing.
CREATE TABLE tenant_cas (
    tenant_id           uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    certificate_pem     text NOT NULL,
    private_key_sealed  bytea NOT NULL CHECK (length(private_key_sealed) > 28),
    not_after           timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- NATS users issued to sites (the public nkey only; the seed never leaves the edge). Kept
-- after the site is deleted (site_id becomes NULL) so a revoked key stays in the account's
-- revocation list until its JWT would have expired anyway.
CREATE TABLE site_nats_users (
    public_key   text PRIMARY KEY CHECK (public_key ~ '^U[A-Z2-7]{55}$'),
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    site_id      uuid,
    issued_at    timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    CHECK (expires_at > issued_at),
    FOREIGN KEY (tenant_id, site_id) REFERENCES sites (tenant_id, id) ON DELETE SET NULL (site_id)
);
CREATE INDEX site_nats_users_site_idx ON site_nats_users (tenant_id, site_id);
CREATE INDEX site_nats_users_revoked_idx ON site_nats_users (tenant_id) WHERE revoked_at IS NOT NULL;

-- Where an enrollment token was redeemed from, for the audit trail.
ALTER TABLE enrollment_tokens ADD COLUMN redeemed_from inet;

-- RLS for every role but the owner, as since migration 5.
ALTER TABLE tenant_cas ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenant_cas
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());
ALTER TABLE site_nats_users ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON site_nats_users
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());

-- A CA is created once and never edited; users are issued and revoked.
GRANT SELECT, INSERT ON tenant_cas TO patronus_app;
GRANT SELECT, INSERT ON site_nats_users TO patronus_app;
GRANT UPDATE (revoked_at) ON site_nats_users TO patronus_app;
