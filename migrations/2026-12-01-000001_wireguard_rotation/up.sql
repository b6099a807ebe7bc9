-- Scheduled WireGuard key rotation. The edge makes its next key pair itself and sends only the
-- public key (POST /api/v1/edge/wireguard-key); the controller keeps it here while the rotation
-- runs: announced to the site's peers (a second peer entry without allowed IPs), then committed
-- (the site's intent names it, its peers move the allowed IPs to it) once every peer applied an
-- intent at or above the announcing revision, or the announcement is older than
-- provisioning.wireguard_commit_timeout_s.
ALTER TABLE sites
    ADD COLUMN wg_next_public_key text
        CHECK (wg_next_public_key ~ '^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$'),
    -- When the edge sent it.
    ADD COLUMN wg_next_submitted_at timestamptz,
    -- The lowest revision among the peers' intents that first carried it (NULL until published).
    ADD COLUMN wg_next_announce_revision bigint CHECK (wg_next_announce_revision > 0),
    ADD COLUMN wg_next_announced_at timestamptz,
    -- When the current key was committed by a rotation (NULL: the key of the enrollment).
    ADD COLUMN wg_key_rotated_at timestamptz,
    -- One pending key per site, never the site's own current key, and the phase columns only
    -- while a key is pending.
    ADD CONSTRAINT sites_wg_next_differs CHECK (wg_next_public_key <> wg_public_key),
    ADD CONSTRAINT sites_wg_next_phase CHECK (
        wg_next_public_key IS NOT NULL
        OR (wg_next_submitted_at IS NULL AND wg_next_announce_revision IS NULL
            AND wg_next_announced_at IS NULL)),
    ADD CONSTRAINT sites_wg_next_public_key_key UNIQUE (tenant_id, wg_next_public_key);

-- The highest intent revision each site reported applied (IntentApplied events and heartbeats),
-- which tells the publisher when every peer has the announcement.
ALTER TABLE site_intents
    ADD COLUMN applied_revision bigint CHECK (applied_revision > 0),
    ADD COLUMN applied_at timestamptz;
