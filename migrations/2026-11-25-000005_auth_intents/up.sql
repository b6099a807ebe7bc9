-- Lookups that must happen before the tenant is known, and intent bookkeeping.
--
-- Row-level security now applies to every role but the owner (NO FORCE). The application role
-- is never the owner, so nothing changes for it; what changes is that the few SECURITY DEFINER
-- functions below, owned by the owner, can answer the questions that precede knowing a tenant
-- (which operator has this e-mail, which API token has this hash, which tenants exist). They
-- are the only gates around RLS, each returns the minimum, and the application role can do
-- nothing else with owner rights.

DO $$
DECLARE t record;
BEGIN
    FOR t IN
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relforcerowsecurity
    LOOP
        EXECUTE format('ALTER TABLE %I NO FORCE ROW LEVEL SECURITY', t.relname);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION patronus_ensure_path_metrics_partitions(from_day date, days integer)
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
            EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', part);
            EXECUTE format(
                'CREATE POLICY tenant_isolation ON %I USING (tenant_id = patronus_current_tenant()) '
                'WITH CHECK (tenant_id = patronus_current_tenant())', part);
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

-- Login: the operator with this e-mail (case-insensitive), if any.
CREATE FUNCTION patronus_operator_for_login(login_email text)
    RETURNS TABLE (id uuid, msp_id uuid, tenant_id uuid, email text, role text, password_hash text, disabled boolean)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    SELECT o.id, o.msp_id, o.tenant_id, o.email, o.role, o.password_hash, o.disabled_at IS NOT NULL
    FROM operators o WHERE lower(o.email) = lower(login_email)
$$;

-- API token authentication: the live token with this SHA-256, if any.
CREATE FUNCTION patronus_api_token_for_hash(hash bytea)
    RETURNS TABLE (id uuid, tenant_id uuid, msp_id uuid, role text, name text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    SELECT k.id, k.tenant_id, t.msp_id, k.role, k.name
    FROM api_tokens k JOIN tenants t ON t.id = k.tenant_id
    WHERE k.token_hash = hash AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
$$;

-- Record a token's use without giving the application a way around RLS.
CREATE FUNCTION patronus_api_token_touch(token_id uuid)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    UPDATE api_tokens SET last_used_at = now()
    WHERE id = token_id AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
$$;

-- Background jobs (intent publisher, retention) iterate over every tenant.
CREATE FUNCTION patronus_all_tenants()
    RETURNS TABLE (id uuid, msp_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $$ SELECT t.id, t.msp_id FROM tenants t ORDER BY t.id $$;

-- Bootstrap: the first MSP and its admin (patronus-controller admin create). Refuses an
-- existing MSP name or e-mail.
CREATE FUNCTION patronus_bootstrap_msp(msp_name text, admin_email text, admin_password_hash text)
    RETURNS TABLE (msp_id uuid, operator_id uuid)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    new_msp uuid;
    new_operator uuid;
BEGIN
    INSERT INTO msps (name) VALUES (msp_name) RETURNING msps.id INTO new_msp;
    INSERT INTO operators (msp_id, tenant_id, email, password_hash, role)
        VALUES (new_msp, NULL, admin_email, admin_password_hash, 'msp_admin')
        RETURNING operators.id INTO new_operator;
    INSERT INTO audit_log (msp_id, tenant_id, actor_kind, actor_label, action, target_kind, target_id)
        VALUES (new_msp, NULL, 'system', 'patronus-controller admin create', 'msp.create', 'msp', new_msp::text);
    RETURN QUERY SELECT new_msp, new_operator;
END
$$;

REVOKE ALL ON FUNCTION patronus_operator_for_login(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION patronus_api_token_for_hash(bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION patronus_api_token_touch(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION patronus_all_tenants() FROM PUBLIC;
REVOKE ALL ON FUNCTION patronus_bootstrap_msp(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION patronus_operator_for_login(text) TO patronus_app;
GRANT EXECUTE ON FUNCTION patronus_api_token_for_hash(bytea) TO patronus_app;
GRANT EXECUTE ON FUNCTION patronus_api_token_touch(uuid) TO patronus_app;
GRANT EXECUTE ON FUNCTION patronus_all_tenants() TO patronus_app;
GRANT EXECUTE ON FUNCTION patronus_bootstrap_msp(text, text, text) TO patronus_app;

-- Intent revisions rise across the whole installation, so a revision is never reused even if
-- a site is deleted and recreated.
CREATE SEQUENCE intent_revision_seq AS bigint START 1;
GRANT USAGE ON SEQUENCE intent_revision_seq TO patronus_app;

-- The last intent published per site: its revision and content digest (so an unchanged intent
-- is not republished).
CREATE TABLE site_intents (
    tenant_id     uuid NOT NULL,
    site_id       uuid NOT NULL,
    revision      bigint NOT NULL CHECK (revision > 0),
    digest        bytea NOT NULL CHECK (length(digest) = 32),
    published_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id),
    FOREIGN KEY (tenant_id, site_id) REFERENCES sites (tenant_id, id) ON DELETE CASCADE
);
ALTER TABLE site_intents ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON site_intents
    USING (tenant_id = patronus_current_tenant()) WITH CHECK (tenant_id = patronus_current_tenant());
GRANT SELECT, INSERT, UPDATE, DELETE ON site_intents TO patronus_app;

-- Cost per GB is a plain float everywhere else (proto, scoring); keep one representation.
ALTER TABLE endpoints ALTER COLUMN cost_per_gb TYPE double precision;
