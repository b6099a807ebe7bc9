//! Prometheus metrics, rendered as text at `GET /metrics`.
//!
//! A small hand-rolled registry (counters, gauges, fixed-bucket histograms on atomics) keeps
//! the dependency count down; the one labelled family, HTTP requests, is keyed by the matched
//! route pattern (not the raw path), method and status, so its cardinality stays bounded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{get, web, HttpResponse};

use crate::server::AppState;

/// Latency buckets in seconds (1 ms to 10 s).
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A counter family with one label whose values are a fixed set of `'static` strings (drop
/// reasons), so its cardinality is bounded by the code.
#[derive(Default)]
pub struct LabelledCounter(Mutex<BTreeMap<&'static str, u64>>);

impl LabelledCounter {
    pub fn add(&self, label: &'static str, n: u64) {
        if let Ok(mut map) = self.0.lock() {
            *map.entry(label).or_default() += n;
        }
    }
    pub fn inc(&self, label: &'static str) {
        self.add(label, 1);
    }
    pub fn get(&self, label: &str) -> u64 {
        self.0
            .lock()
            .ok()
            .and_then(|map| map.get(label).copied())
            .unwrap_or(0)
    }
    pub fn total(&self) -> u64 {
        self.0.lock().map(|map| map.values().sum()).unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, label: &str) {
        if let Ok(map) = self.0.lock() {
            for (value, n) in map.iter() {
                let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
            }
        }
    }
}

/// Cumulative-bucket histogram; sums are kept in microseconds to stay integral.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6).max(0.0) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Every metric of one controller process.
#[derive(Default)]
pub struct Metrics {
    pub intents_published: Counter,
    pub intent_publish_failures: Counter,
    pub intent_publish_seconds: Histogram,
    pub intent_publisher_leader: Gauge,
    pub ws_slow_clients_dropped: Counter,
    pub flows_stored: Counter,
    pub flow_reports_dropped: Counter,
    /// Edge metric batches (NATS messages) whose samples were written.
    pub metric_batches_stored: Counter,
    /// Path samples written to `path_metrics`.
    pub metric_samples_stored: Counter,
    /// Samples already stored (a redelivered or resent batch), skipped by the database.
    pub metric_samples_duplicate: Counter,
    /// Metric batches dropped (acknowledged as terminated), by reason.
    pub metric_batches_dropped: LabelledCounter,
    /// Samples dropped from batches that were otherwise stored, by reason.
    pub metric_samples_dropped: LabelledCounter,
    /// Metric batches handed back for a later retry (the write failed transiently).
    pub metric_batches_retried: Counter,
    /// From the JetStream publish time of a batch to its being taken for writing.
    pub metric_ingest_lag_seconds: Histogram,
    /// One multi-batch write transaction.
    pub metric_write_seconds: Histogram,
    /// Writes of the latest path state to Redis that failed.
    pub metric_state_write_failures: Counter,
    /// `path_metrics` events forwarded to WebSocket clients.
    pub metric_events_emitted: Counter,
    /// (route pattern, method, status) → latency histogram.
    http: Mutex<BTreeMap<(String, String, u16), Histogram>>,
}

impl Metrics {
    pub fn observe_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let Ok(mut http) = self.http.lock() else {
            return;
        };
        http.entry((route.to_owned(), method.to_owned(), status))
            .or_default()
            .observe(seconds);
    }

    /// The Prometheus text exposition of everything, plus the live pool and NATS state.
    pub fn render(&self, state: &AppState) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP patronus_http_request_duration_seconds HTTP requests by route, method and status.");
        let _ = writeln!(
            out,
            "# TYPE patronus_http_request_duration_seconds histogram"
        );
        if let Ok(http) = self.http.lock() {
            for ((route, method, status), histogram) in http.iter() {
                let labels = format!(
                    "route=\"{}\",method=\"{method}\",status=\"{status}\"",
                    route.replace('"', "'")
                );
                histogram.render(&mut out, "patronus_http_request_duration_seconds", &labels);
            }
        }
        let _ = writeln!(
            out,
            "# HELP patronus_intents_published_total Site intents written to the KV bucket."
        );
        let _ = writeln!(out, "# TYPE patronus_intents_published_total counter");
        let _ = writeln!(
            out,
            "patronus_intents_published_total {}",
            self.intents_published.get()
        );
        let _ = writeln!(
            out,
            "# HELP patronus_intent_publish_failures_total Tenant publishes that failed (retried)."
        );
        let _ = writeln!(out, "# TYPE patronus_intent_publish_failures_total counter");
        let _ = writeln!(
            out,
            "patronus_intent_publish_failures_total {}",
            self.intent_publish_failures.get()
        );
        let _ = writeln!(
            out,
            "# HELP patronus_intent_publish_seconds Time to compile and publish one tenant."
        );
        let _ = writeln!(out, "# TYPE patronus_intent_publish_seconds histogram");
        self.intent_publish_seconds
            .render(&mut out, "patronus_intent_publish_seconds", "");
        let _ = writeln!(
            out,
            "# HELP patronus_intent_publisher_leader 1 if this replica holds the publisher lease."
        );
        let _ = writeln!(out, "# TYPE patronus_intent_publisher_leader gauge");
        let _ = writeln!(
            out,
            "patronus_intent_publisher_leader {}",
            self.intent_publisher_leader.get()
        );
        let _ = writeln!(out, "# HELP patronus_flows_stored_total Flow records from edge reports written to the database.");
        let _ = writeln!(out, "# TYPE patronus_flows_stored_total counter");
        let _ = writeln!(
            out,
            "patronus_flows_stored_total {}",
            self.flows_stored.get()
        );
        let _ = writeln!(out, "# HELP patronus_flow_reports_dropped_total Edge flow reports dropped (malformed, wrong tenant or site, not stored).");
        let _ = writeln!(out, "# TYPE patronus_flow_reports_dropped_total counter");
        let _ = writeln!(
            out,
            "patronus_flow_reports_dropped_total {}",
            self.flow_reports_dropped.get()
        );
        self.render_metrics_ingest(&mut out);
        let _ = writeln!(out, "# HELP patronus_ws_slow_clients_dropped_total WebSocket clients disconnected for reading too slowly.");
        let _ = writeln!(out, "# TYPE patronus_ws_slow_clients_dropped_total counter");
        let _ = writeln!(
            out,
            "patronus_ws_slow_clients_dropped_total {}",
            self.ws_slow_clients_dropped.get()
        );
        let pools = state.pools();
        let _ = writeln!(
            out,
            "# HELP patronus_db_pool_connections Database connections by pool (shared, worker-N) and state."
        );
        let _ = writeln!(out, "# TYPE patronus_db_pool_connections gauge");
        for (name, pool) in &pools {
            let status = pool.status();
            for (state, n) in [
                ("open", status.size),
                ("idle", status.available),
                ("max", status.max_size),
            ] {
                let _ = writeln!(
                    out,
                    "patronus_db_pool_connections{{pool=\"{name}\",state=\"{state}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP patronus_db_pool_waiting Requests waiting for a database connection, by pool."
        );
        let _ = writeln!(out, "# TYPE patronus_db_pool_waiting gauge");
        for (name, pool) in &pools {
            let _ = writeln!(
                out,
                "patronus_db_pool_waiting{{pool=\"{name}\"}} {}",
                pool.status().waiting
            );
        }
        let connected = matches!(
            state.nats.connection_state(),
            async_nats::connection::State::Connected
        );
        let _ = writeln!(
            out,
            "# HELP patronus_nats_connected 1 while the NATS connection is up."
        );
        let _ = writeln!(out, "# TYPE patronus_nats_connected gauge");
        let _ = writeln!(out, "patronus_nats_connected {}", i32::from(connected));
        let stats = state.nats.statistics();
        let _ = writeln!(
            out,
            "# HELP patronus_nats_connects_total NATS (re)connections."
        );
        let _ = writeln!(out, "# TYPE patronus_nats_connects_total counter");
        let _ = writeln!(
            out,
            "patronus_nats_connects_total {}",
            stats.connects.load(Ordering::Relaxed)
        );
        out
    }
}

impl Metrics {
    fn render_metrics_ingest(&self, out: &mut String) {
        let counters = [
            (
                "patronus_metric_batches_stored_total",
                "Edge path-metric batches whose samples were written.",
                &self.metric_batches_stored,
            ),
            (
                "patronus_metric_samples_stored_total",
                "Path samples written to path_metrics.",
                &self.metric_samples_stored,
            ),
            (
                "patronus_metric_samples_duplicate_total",
                "Path samples already stored (redelivered or resent batches), skipped.",
                &self.metric_samples_duplicate,
            ),
            (
                "patronus_metric_batches_retried_total",
                "Path-metric batches handed back for a later retry after a failed write.",
                &self.metric_batches_retried,
            ),
            (
                "patronus_metric_state_write_failures_total",
                "Writes of the latest path state to Redis that failed.",
                &self.metric_state_write_failures,
            ),
            (
                "patronus_metric_events_emitted_total",
                "path_metrics events forwarded to WebSocket clients.",
                &self.metric_events_emitted,
            ),
        ];
        for (name, help, counter) in counters {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", counter.get());
        }
        let _ = writeln!(
            out,
            "# HELP patronus_metric_batches_dropped_total Path-metric batches dropped, by reason."
        );
        let _ = writeln!(out, "# TYPE patronus_metric_batches_dropped_total counter");
        self.metric_batches_dropped
            .render(out, "patronus_metric_batches_dropped_total", "reason");
        let _ = writeln!(out, "# HELP patronus_metric_samples_dropped_total Path samples dropped from stored batches, by reason.");
        let _ = writeln!(out, "# TYPE patronus_metric_samples_dropped_total counter");
        self.metric_samples_dropped
            .render(out, "patronus_metric_samples_dropped_total", "reason");
        let _ = writeln!(out, "# HELP patronus_metric_ingest_lag_seconds From a batch's arrival in JetStream to its being taken for writing.");
        let _ = writeln!(out, "# TYPE patronus_metric_ingest_lag_seconds histogram");
        self.metric_ingest_lag_seconds
            .render(out, "patronus_metric_ingest_lag_seconds", "");
        let _ = writeln!(out, "# HELP patronus_metric_write_seconds One write transaction of path samples (many batches).");
        let _ = writeln!(out, "# TYPE patronus_metric_write_seconds histogram");
        self.metric_write_seconds
            .render(out, "patronus_metric_write_seconds", "");
    }
}

/// Record every request's latency by route pattern, method and status.
pub async fn record(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = std::time::Instant::now();
    let route = req
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().to_string();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let response = next.call(req).await?;
    if let Some(state) = state {
        state.metrics.observe_request(
            &route,
            &method,
            response.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
    }
    Ok(response)
}

#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(&state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(0.003);
        h.observe(0.2);
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 1"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.25\"} 2"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 2"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 2"), "{out}");
    }

    #[test]
    fn labelled_counters_render_one_line_per_label() {
        let c = LabelledCounter::default();
        c.inc("syntax");
        c.add("wrong_tenant", 2);
        c.inc("syntax");
        assert_eq!(c.get("syntax"), 2);
        assert_eq!(c.total(), 4);
        let mut out = String::new();
        c.render(&mut out, "d", "reason");
        assert_eq!(
            out,
            "d{reason=\"syntax\"} 2\nd{reason=\"wrong_tenant\"} 2\n"
        );
    }
}
