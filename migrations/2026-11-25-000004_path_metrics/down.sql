DROP FUNCTION patronus_drop_path_metrics_partitions_before(date);
DROP FUNCTION patronus_ensure_path_metrics_partitions(date, integer);
DROP TABLE path_metrics;
