ALTER TABLE endpoints ALTER COLUMN cost_per_gb TYPE numeric(12, 6);
DROP TABLE site_intents;
DROP SEQUENCE intent_revision_seq;
DROP FUNCTION patronus_bootstrap_msp(text, text, text);
DROP FUNCTION patronus_all_tenants();
DROP FUNCTION patronus_api_token_touch(uuid);
DROP FUNCTION patronus_api_token_for_hash(bytea);
DROP FUNCTION patronus_operator_for_login(text);

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

DO $$
DECLARE t record;
BEGIN
    FOR t IN
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relrowsecurity
          AND c.relname <> '__diesel_schema_migrations'
    LOOP
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t.relname);
    END LOOP;
END
$$;
