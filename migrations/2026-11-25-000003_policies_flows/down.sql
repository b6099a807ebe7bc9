DROP TABLE flows;
DROP TABLE policies;
