ALTER TABLE enrollment_tokens DROP COLUMN redeemed_from;
DROP TABLE site_nats_users;
DROP TABLE tenant_cas;
