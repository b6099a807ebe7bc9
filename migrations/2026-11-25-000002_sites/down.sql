DROP TABLE enrollment_tokens;
DROP TABLE site_certificates;
DROP TABLE paths;
DROP TABLE endpoints;
DROP TABLE sites;
