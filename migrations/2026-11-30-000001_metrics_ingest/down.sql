DROP TRIGGER path_metrics_rollup ON path_metrics;
DROP FUNCTION patronus_path_metrics_rollup();
DROP TABLE path_metrics_1m;
ALTER TABLE paths DROP COLUMN metrics_at;
