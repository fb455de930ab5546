//! Prometheus metrics (the `metrics` facade with the Prometheus exporter's recorder, rendered by
//! the admin listener at `GET /metrics`). One process-wide recorder, installed on first use.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `imagegate_requests_total` | counter | `outcome`, `status` |
//! | `imagegate_images_total` | counter | `client` |
//! | `imagegate_spend_microdollars_total` | counter | `client` |
//! | `imagegate_rate_limit_rejections_total` | counter | |
//! | `imagegate_quota_rejections_total` | counter | |
//! | `imagegate_quota_settle_failures_total` | counter | |
//! | `imagegate_forwarding_task_failures_total` | counter | |
//! | `imagegate_request_duration_seconds` | histogram | |
//! | `imagegate_validation_duration_seconds` | histogram | |
//! | `imagegate_validation_cache_hits_total` | counter | |
//! | `imagegate_validation_cache_misses_total` | counter | |
//! | `imagegate_upstream_duration_seconds` | histogram | |
//! | `imagegate_in_flight_requests` | gauge | |
//! | `imagegate_decodes_running` | gauge | |
//! | `imagegate_decodes_cancelled_total` | counter | |
//! | `imagegate_cut_through_total` | counter | `result` (`passed`, `refused`, `caller_gone`) |
//! | `imagegate_ledger_queue_depth` | gauge | |
//! | `imagegate_ledger_write_seconds` | histogram | |
//! | `imagegate_model_shutdown_days` | gauge | `model` |
//! | `imagegate_model_live` | gauge | `model` |
//! | `imagegate_upstream_key_state` | gauge | `key` (0 healthy, 1 benched, 2 trial pending) |
//! | `imagegate_upstream_key_requests_total` | counter | `key` |
//! | `imagegate_upstream_key_failures_total` | counter | `key` |
//! | `imagegate_upstream_key_benched_total` | counter | `key`, `reason` (`failures`, `rate_limit`) |
//! | `imagegate_upstream_retries_total` | counter | `reason` (`rate_limit`, `connect`) |
//! | `imagegate_config_reloads_total` | counter | `result` (`applied`, `rejected`) |
//! | `imagegate_config_reload_failures_total` | counter | |
//! | `imagegate_config_last_reload_success_timestamp_seconds` | gauge | |
//! | `imagegate_config_generation` | gauge | |
//! | `imagegate_tls_handshake_failures_total` | counter | `listener` |
//! | `imagegate_ledger_chain_head_seq` | gauge (rendered by `/metrics`) | |
//! | `imagegate_ledger_chain_head_info` | gauge, always 1 (rendered by `/metrics`) | `seq`, `hash` |
//!
//! The model gauges are set at start (`models_check::at_start`), and again after a reload that
//! changes `[models]`, `[validation]` or `[upstream]`:
//! `imagegate_model_shutdown_days` is the number of days from today (UTC) to a configured
//! model's shutdown date (the earlier of the configured one and the one the upstream's
//! `GET /models` announced; negative once passed), only for models with a known date;
//! `imagegate_model_live` is 1 when the upstream lists the model, 0 when it does not, and
//! absent when the check did not run or failed.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the recorder (idempotent) and return the handle that renders it.
/// The ledger chain's head as Prometheus text: `imagegate_ledger_chain_head_seq` (a gauge) and
/// `imagegate_ledger_chain_head_info{seq,hash} 1` (an info gauge whose label is the hash), so
/// a system outside can keep the head and later compare it with `imagegate audit verify
/// --expect-head`. Rendered by hand at each scrape: one series, never one per past head.
pub fn chain_head_lines(head: Option<&crate::ledger::ChainHead>) -> String {
    let (seq, hash) = head.map_or((0, ""), |h| (h.seq, h.hash.as_str()));
    format!(
        "# HELP imagegate_ledger_chain_head_seq Sequence number of the last ledger chain entry this process committed (0: none)\n\
         # TYPE imagegate_ledger_chain_head_seq gauge\n\
         imagegate_ledger_chain_head_seq {seq}\n\
         # HELP imagegate_ledger_chain_head_info The last ledger chain entry this process committed, its hash as a label\n\
         # TYPE imagegate_ledger_chain_head_info gauge\n\
         imagegate_ledger_chain_head_info{{seq=\"{seq}\",hash=\"{hash}\"}} 1\n"
    )
}

pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let buckets = [
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets(&buckets)
            .expect("static, non-empty bucket list")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding program); then ours only renders.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "imagegate_config_reloads_total",
        "Configuration reloads (SIGHUP, POST /admin/reload) by result: applied or rejected"
    );
    describe_counter!(
        "imagegate_config_reload_failures_total",
        "Configuration reloads rejected (nothing changed)"
    );
    describe_gauge!(
        "imagegate_config_last_reload_success_timestamp_seconds",
        "Unix time of the last configuration applied (the start, or the last applied reload)"
    );
    describe_gauge!(
        "imagegate_config_generation",
        "Generation of the configuration in force: 1 at start, +1 per applied reload"
    );
    describe_counter!(
        "imagegate_tls_handshake_failures_total",
        "TLS handshakes that failed or did not finish within header_read_timeout, by listener"
    );
    describe_counter!(
        "imagegate_requests_total",
        "Requests to the edits route by outcome and status"
    );
    describe_counter!("imagegate_images_total", "Images returned, by client");
    describe_counter!(
        "imagegate_spend_microdollars_total",
        "Settled spend in micro-USD, by client"
    );
    describe_counter!(
        "imagegate_rate_limit_rejections_total",
        "Requests refused by a rate limit"
    );
    describe_counter!(
        "imagegate_quota_rejections_total",
        "Requests refused by a quota"
    );
    describe_counter!(
        "imagegate_quota_settle_failures_total",
        "Quota settlements that failed after every retry (the quota kept what was reserved)"
    );
    describe_counter!(
        "imagegate_forwarding_task_failures_total",
        "Forwarding tasks that ended without completing their record (a panic); the record was completed for them"
    );
    describe_histogram!(
        "imagegate_request_duration_seconds",
        "Total time per request"
    );
    describe_histogram!(
        "imagegate_validation_duration_seconds",
        "Time spent parsing and checking a request"
    );
    describe_counter!(
        "imagegate_validation_cache_hits_total",
        "Files known valid from the validated-image cache (not checked again)"
    );
    describe_counter!(
        "imagegate_validation_cache_misses_total",
        "Files looked up in the validated-image cache and checked"
    );
    describe_histogram!(
        "imagegate_upstream_duration_seconds",
        "Upstream time, request sent to answer read"
    );
    describe_gauge!("imagegate_in_flight_requests", "Requests being handled");
    describe_gauge!(
        "imagegate_decodes_running",
        "Image checks running on the blocking pool (server.max_concurrent_decodes at most)"
    );
    describe_counter!(
        "imagegate_decodes_cancelled_total",
        "Image checks stopped at a row because their caller had left"
    );
    describe_counter!(
        "imagegate_cut_through_total",
        "Requests sent upstream while their images were checked (upstream.cut_through), by how the check ended: passed, refused (upload aborted), caller_gone"
    );
    describe_gauge!(
        "imagegate_rate_backend_up",
        "1 when the shared rate-limit backend (Redis) answered the last check, 0 when it did not"
    );
    describe_counter!(
        "imagegate_rate_backend_fallbacks_total",
        "Rate checks answered by this replica's local limiter because Redis could not be reached (fail_open)"
    );
    describe_gauge!(
        "imagegate_ledger_queue_depth",
        "Ledger operations waiting for the writer"
    );
    describe_histogram!(
        "imagegate_ledger_write_seconds",
        "Time to commit a ledger record"
    );
    describe_gauge!(
        "imagegate_model_shutdown_days",
        "Days until a configured model shuts down (configured or upstream date, the earlier)"
    );
    describe_gauge!(
        "imagegate_model_live",
        "1 when the upstream's GET /models lists a configured model, 0 when it does not"
    );
    describe_gauge!(
        "imagegate_upstream_key_state",
        "Upstream key breaker: 0 healthy, 1 benched, 2 trial pending"
    );
    describe_counter!(
        "imagegate_upstream_key_requests_total",
        "Attempts sent with an upstream key"
    );
    describe_counter!(
        "imagegate_upstream_key_failures_total",
        "Connect failures, 5xx answers and timeouts of an upstream key"
    );
    describe_counter!(
        "imagegate_upstream_key_benched_total",
        "Times an upstream key was benched, by reason (failures, rate_limit)"
    );
    describe_counter!(
        "imagegate_upstream_retries_total",
        "Requests sent to a second key after a refusal (rate_limit) or a connection that never opened (connect)"
    );
}

/// Count a finished request (called exactly once per ledger record, when it is written).
pub fn request_finished(r: &crate::ledger::Record) {
    use metrics::{counter, histogram};
    let status = r
        .status
        .map_or_else(|| "none".to_string(), |s| s.to_string());
    counter!("imagegate_requests_total", "outcome" => r.outcome.as_str(), "status" => status)
        .increment(1);
    if let Some(ms) = r.total_ms {
        histogram!("imagegate_request_duration_seconds").record(ms as f64 / 1000.0);
    }
    if let Some(ms) = r.upstream_ms {
        histogram!("imagegate_upstream_duration_seconds").record(ms as f64 / 1000.0);
    }
    if let Some(client) = &r.client {
        if let Some(images) = r.images_returned.filter(|&i| i > 0) {
            counter!("imagegate_images_total", "client" => client.clone())
                .increment(u64::from(images));
        }
        if r.cost_settled_micros > 0 {
            counter!("imagegate_spend_microdollars_total", "client" => client.clone())
                .increment(r.cost_settled_micros as u64);
        }
    }
    match r.reason_code.as_deref() {
        Some("rate_limit_exceeded") => {
            counter!("imagegate_rate_limit_rejections_total").increment(1)
        }
        Some("insufficient_quota") => counter!("imagegate_quota_rejections_total").increment(1),
        _ => {}
    }
}
