DROP TABLE audit_log;
DROP TABLE api_tokens;
DROP TABLE operators;
DROP TABLE tenants;
DROP TABLE msps;
DROP FUNCTION patronus_current_msp();
DROP FUNCTION patronus_current_tenant();
REVOKE USAGE ON SCHEMA public FROM patronus_app;
GRANT USAGE ON SCHEMA public TO PUBLIC;
