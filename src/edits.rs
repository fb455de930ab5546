//! The edits service: the leaf behind authentication for `POST /v1/images/edits`.
//!
//! In order: content type (before the body is read) → declared length against the body cap →
//! the capped body under a deadline → the multipart form and its field rules → the end user, the
//! per-user rate limits and the quota reservation (before any decoding) → the PNG checks on the
//! blocking pool → the canonical body → the `forwarding` ledger record → the upstream call. The
//! upstream call runs in its own task, so it finishes (the answer read to the end, the quota
//! settled, the record completed) even when the caller disconnects. Every fact learned on the
//! way is written into the request's [`Trail`] for the ledger.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::sync::{mpsc, oneshot};
use tower::Service;

use crate::app::AppState;
use crate::body::{Body, BoxError};
use crate::edit::canonical::{self, CanonicalBody};
use crate::edit::png_check::{self, CheckedPng};
use crate::edit::{ImageEdit, form};
use crate::error::GatewayError;
use crate::ledger::store::LedgerOp;
use crate::ledger::{Outcome, Record};
use crate::limits::quota::{QuotaStore, Reservation};
use crate::limits::rate::RateStatus;
use crate::limits::{EndUser, resolve_end_user};
use crate::middleware::BoxFuture;
use crate::middleware::auth::Caller;
use crate::middleware::usage::{Trail, note_error};
use crate::upstream::{error_chain, passed_headers};

#[derive(Clone)]
pub struct EditsService {
    state: Arc<AppState>,
}

impl EditsService {
    pub fn new(state: Arc<AppState>) -> Self {
        EditsService { state }
    }
}

impl Service<Request<Incoming>> for EditsService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move {
            let mut rate = None;
            let result = handle(state, req, &mut rate).await;
            let mut resp = match result {
                Ok(resp) => resp,
                Err(e) => {
                    let p = e.parts();
                    tracing::info!(
                        status = p.status.as_u16(),
                        code = p.code.unwrap_or("-"),
                        param = p.param.as_deref().unwrap_or("-"),
                        "request refused"
                    );
                    e.into_response()
                }
            };
            if let Some(status) = rate {
                set_rate_headers(resp.headers_mut(), &status);
            }
            Ok(resp)
        })
    }
}

/// The gateway's own `x-ratelimit-*` headers replace the upstream's, which are kept under
/// `x-upstream-ratelimit-*`.
fn set_rate_headers(headers: &mut http::HeaderMap, status: &RateStatus) {
    let upstream: Vec<(http::HeaderName, HeaderValue)> = headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-ratelimit-"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (name, value) in upstream {
        headers.remove(&name);
        let renamed = format!("x-upstream-{}", &name.as_str()[2..]);
        if let Ok(renamed) = http::HeaderName::from_bytes(renamed.as_bytes()) {
            headers.append(renamed, value);
        }
    }
    for (name, value) in status.headers() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    rate: &mut Option<RateStatus>,
) -> Result<Response<Body>, GatewayError> {
    let caller = req.extensions().get::<Caller>().cloned().ok_or_else(|| {
        tracing::error!("edits service reached without an authenticated caller");
        GatewayError::Internal
    })?;
    let trail = req.extensions().get::<Trail>().cloned().ok_or_else(|| {
        tracing::error!("edits service reached without a usage record");
        GatewayError::Internal
    })?;
    let validation_started = std::time::Instant::now();
    let boundary = form::boundary(req.headers().get(header::CONTENT_TYPE))?;
    let body = read_body(&state, req).await?;
    let parts = form::parse_parts(&boundary, body, state.form_rules.max_parts).await?;
    // Who pays. Resolved before the field rules only so that the record of a refused request
    // names its end user; its own refusals are reported after the field rules.
    let limits = &state.config.limits;
    let identity = resolve_end_user(
        &state.config.clients[caller.index],
        form::text_field(&parts, "user").as_deref(),
        limits.missing_user,
        limits.personal_user_mismatch,
        state.config.validation.max_user_chars,
    );
    if let Ok(who) = &identity {
        trail.update(|r| r.user = who.user.clone());
    }
    let mut edit = form::check(parts, &state.form_rules)?;
    let prompt_policy = state.config.ledger.prompt;
    trail.update(|r| {
        r.model = Some(edit.model.clone());
        r.n = Some(edit.n);
        r.size = Some(edit.size.as_str().to_owned());
        r.response_format = Some(edit.response_format.as_str().to_owned());
        r.prompt = prompt_policy.apply(&edit.prompt);
    });

    let who = identity?;
    if let Some(user) = &who.user {
        tracing::Span::current().record("user", user.as_str());
    }
    // The normalized id goes upstream, so OpenAI sees the id the gateway charged.
    edit.user = who.user.clone();
    match state.rates.check_user(&who, edit.n) {
        Ok(status) => *rate = Some(status),
        Err((e, status)) => {
            *rate = Some(status);
            return Err(e);
        }
    }
    let reservation = reserve(&state, &who, &edit).await?;
    trail.update(|r| r.cost_reserved_micros = reservation.reserved_micros());

    let checked = check_images(&state, &edit).await;
    if let Some((image, mask)) = &checked.digests {
        trail.update(|r| {
            (r.image_sha256, r.image_bytes, r.image_width, r.image_height) = image.fields();
            if let Some(mask) = mask {
                (r.mask_sha256, r.mask_bytes, r.mask_width, r.mask_height) = mask.fields();
            }
        });
    }
    let (image, mask) = match checked.result {
        Ok(checked) => checked,
        Err(e) => {
            // Refund before answering, so the caller's next request sees the quota restored.
            reservation.settle(0).await;
            return Err(e);
        }
    };
    metrics::histogram!("imagegate_validation_duration_seconds")
        .record(validation_started.elapsed().as_secs_f64());
    let canonical = canonical::encode(&edit, image.bytes, mask.map(|m| m.bytes));
    forward(state, canonical, reservation, trail).await
}

/// Reserve `n × price` against the quotas on the blocking pool. The guard refunds the whole
/// reservation if the request ends before it is settled (a PNG rejection, a disconnect).
async fn reserve(
    state: &Arc<AppState>,
    who: &EndUser,
    edit: &ImageEdit,
) -> Result<ReservationGuard, GatewayError> {
    let quotas = state.quotas.clone();
    let n = u32::from(edit.n);
    let price_each = quotas.price(&edit.model, edit.size.as_str(), 1);
    let cost = price_each * i64::from(n);
    let who = who.clone();
    let reservation = tokio::task::spawn_blocking(move || quotas.reserve(&who, n, cost))
        .await
        .map_err(|_| GatewayError::Internal)??;
    Ok(ReservationGuard {
        quotas: state.quotas.clone(),
        reservation: Some(reservation),
        price_each,
    })
}

/// A quota reservation that is settled exactly once: explicitly, or as a full refund on drop.
pub struct ReservationGuard {
    quotas: Arc<QuotaStore>,
    reservation: Option<Reservation>,
    /// Micro-dollars per image of this request's model and size.
    price_each: i64,
}

impl ReservationGuard {
    /// Settle with the images actually delivered (0: a full refund); returns the cost charged.
    pub async fn settle(mut self, images: u32) -> i64 {
        let micros = self.price_each * i64::from(images);
        if let Some(r) = self.reservation.take() {
            let quotas = self.quotas.clone();
            let done = tokio::task::spawn_blocking(move || quotas.settle(&r, images, micros)).await;
            if !matches!(done, Ok(Ok(()))) {
                tracing::error!("settling a quota reservation failed");
            }
        }
        micros
    }

    pub fn reserved_micros(&self) -> i64 {
        self.reservation.as_ref().map_or(0, |r| r.micros)
    }
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            let quotas = self.quotas.clone();
            let refund = move || {
                if let Err(e) = quotas.settle(&r, 0, 0) {
                    tracing::error!(error = %e, "refunding a quota reservation failed");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(refund);
                }
                Err(_) => refund(),
            }
        }
    }
}

/// Read the whole body under the cap and the deadline. A declared length over the cap is refused
/// before a single body byte is read.
async fn read_body(state: &AppState, req: Request<Incoming>) -> Result<Bytes, GatewayError> {
    let cap = state.body_cap;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > cap as u64) {
        return Err(GatewayError::BodyTooLarge { limit: cap });
    }
    let limited = Limited::new(req.into_body(), cap);
    match tokio::time::timeout(state.body_timeout, limited.collect()).await {
        Err(_) => Err(GatewayError::BodyTimeout {
            after: state.body_timeout,
        }),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::BodyTooLarge { limit: cap })
        }
        Ok(Err(e)) => {
            tracing::info!(error = %error_chain(&*e), "request body could not be read");
            Err(GatewayError::BodyIncomplete)
        }
    }
}

/// What the ledger keeps of an uploaded file: digest and size always, dimensions once known.
#[derive(Debug, Clone)]
struct FileDigest {
    sha256: String,
    bytes: u64,
    dims: Option<(u32, u32)>,
}

impl FileDigest {
    fn of(data: &[u8]) -> FileDigest {
        use sha2::Digest;
        FileDigest {
            sha256: hex::encode(sha2::Sha256::digest(data)),
            bytes: data.len() as u64,
            dims: None,
        }
    }

    /// The record's (sha256, bytes, width, height) for this file.
    fn fields(&self) -> (Option<String>, Option<u64>, Option<u32>, Option<u32>) {
        let (w, h) = self.dims.unzip();
        (Some(self.sha256.clone()), Some(self.bytes), w, h)
    }
}

struct Checked {
    /// `None` when the check could not run at all.
    digests: Option<(FileDigest, Option<FileDigest>)>,
    result: Result<(CheckedPng, Option<CheckedPng>), GatewayError>,
}

/// Run the PNG checks on the blocking pool, at most `server.max_concurrent_decodes` at once,
/// and take the digests the ledger records (of the bytes as received).
async fn check_images(state: &AppState, edit: &ImageEdit) -> Checked {
    let image = edit.image.bytes.clone();
    let mask = edit.mask.as_ref().map(|m| m.bytes.clone());
    let Ok(_permit) = state.decode_permits.acquire().await else {
        return Checked {
            digests: None,
            result: Err(GatewayError::Internal),
        };
    };
    let rules = state.png_rules.clone();
    let max_bytes = rules.max_bytes;
    let job = tokio::task::spawn_blocking(move || {
        let mut image_digest = FileDigest::of(&image);
        let mut mask_digest = mask.as_deref().map(FileDigest::of);
        let result = (|| {
            let image =
                png_check::check_image(image, mask.is_some(), &rules).map_err(|rejection| {
                    GatewayError::Png {
                        part: "image",
                        rejection,
                        max_bytes,
                    }
                })?;
            image_digest.dims = Some((image.width, image.height));
            let mask = match mask {
                Some(m) => {
                    let m = png_check::check_mask(m, (image.width, image.height), &rules).map_err(
                        |rejection| GatewayError::Png {
                            part: "mask",
                            rejection,
                            max_bytes,
                        },
                    )?;
                    if let Some(d) = mask_digest.as_mut() {
                        d.dims = Some((m.width, m.height));
                    }
                    Some(m)
                }
                None => None,
            };
            Ok((image, mask))
        })();
        Checked {
            digests: Some((image_digest, mask_digest)),
            result,
        }
    });
    job.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "PNG check task failed");
        Checked {
            digests: None,
            result: Err(GatewayError::Internal),
        }
    })
}

/// Forward in a task of its own and stream the answer back.
///
/// The `forwarding` record is committed before any byte goes upstream; if the ledger cannot
/// take it, nothing is forwarded (503) and the refusal is recorded. The task then owns the
/// record and the quota reservation: it reads the answer to its end (even when the caller left), settles the
/// reservation with the images actually returned, and commits the completed record before the
/// caller's body ends, so a caller that saw the whole answer can find its record.
async fn forward(
    state: Arc<AppState>,
    canonical: CanonicalBody,
    reservation: ReservationGuard,
    trail: Trail,
) -> Result<Response<Body>, GatewayError> {
    if !state.upstream.has_key() {
        reservation.settle(0).await;
        return Err(GatewayError::UpstreamKeyMissing);
    }
    // From here on the task owns the record and the reservation. It is spawned before the
    // first await, so a caller that disconnects now cannot leave a record behind unwritten.
    let mut record = trail.hand_off();
    let (head_tx, head_rx) = oneshot::channel();
    let span = tracing::Span::current();
    let task_state = state.clone();
    state.tasks.spawn(tracing::Instrument::instrument(
        async move {
            let state = task_state;
            if let Err(e) = state.ledger.begin_forwarding(record.clone()).await {
                tracing::error!(error = %e, "ledger refused the forwarding record; not forwarding");
                reservation.settle(0).await;
                let refusal = GatewayError::LedgerUnavailable;
                record.outcome = Outcome::Rejected;
                note_error(&mut record, &refusal.parts());
                record.total_ms = Some(trail.elapsed_ms());
                crate::metrics::request_finished(&record);
                // Kept by the writer and retried until the store takes it again.
                state.ledger.finish_detached(LedgerOp::Final(record));
                let _ = head_tx.send(Err(refusal));
                return;
            }
            if head_tx.is_closed() {
                // The caller left while the record was committed: nothing has gone upstream
                // yet, so nothing is spent.
                reservation.settle(0).await;
                record.outcome = Outcome::ClientGone;
                record.reason_message =
                    Some("the caller disconnected before the request was forwarded".into());
                record.images_returned = Some(0);
                complete(&state, record, &trail).await;
                return;
            }
            let sent = std::time::Instant::now();
            match state.upstream.send(canonical).await {
                Err(e) => {
                    record.outcome = match e {
                        GatewayError::UpstreamTimeout { .. } => Outcome::UpstreamTimeout,
                        _ => Outcome::UpstreamError,
                    };
                    note_error(&mut record, &e.parts());
                    record.images_returned = Some(0);
                    record.upstream_ms = Some(sent.elapsed().as_millis() as u64);
                    reservation.settle(0).await;
                    complete(&state, record, &trail).await;
                    let _ = head_tx.send(Err(e));
                }
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let status = parts.status;
                    record.status = Some(status.as_u16());
                    record.upstream_status = Some(status.as_u16());
                    record.upstream_request_id = parts
                        .headers
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let (tx, rx) = mpsc::channel(8);
                    let hint = http_body::Body::size_hint(&body).exact();
                    let _ = head_tx.send(Ok((
                        parts,
                        ChannelBody {
                            rx,
                            remaining: hint,
                        },
                    )));
                    let (outcome, tail) = pump(body, tx, status.is_success()).await;
                    let images = outcome.images as u32;
                    let cost = reservation.settle(images).await;
                    record.images_returned = Some(images);
                    record.cost_settled_micros = cost;
                    record.upstream_ms = Some(sent.elapsed().as_millis() as u64);
                    record.outcome = if outcome.caller_gone {
                        record.reason_message =
                            Some("the caller disconnected before the whole answer was sent".into());
                        Outcome::ClientGone
                    } else if !outcome.complete {
                        record.reason_message = Some("the upstream answer broke off".into());
                        Outcome::UpstreamError
                    } else {
                        Outcome::Answered
                    };
                    tracing::info!(
                        images,
                        caller_gone = outcome.caller_gone,
                        "upstream answer relayed"
                    );
                    complete(&state, record, &trail).await;
                    // Only now does the caller get the end of the answer.
                    tail.finish().await;
                }
            }
        },
        span,
    ));
    let (parts, body) = head_rx.await.map_err(|_| GatewayError::Internal)??;
    let mut resp = Response::new(Body::new(body));
    *resp.status_mut() = parts.status;
    *resp.headers_mut() = passed_headers(&parts.headers);
    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, len.clone());
    }
    if !resp.headers().contains_key(header::CONTENT_TYPE) {
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    Ok(resp)
}

/// Commit the completed record of a forwarded request.
async fn complete(state: &AppState, mut record: Record, trail: &Trail) {
    record.total_ms = Some(trail.elapsed_ms());
    crate::metrics::request_finished(&record);
    let started = std::time::Instant::now();
    if let Err(e) = state.ledger.finish(LedgerOp::Complete(record)).await {
        tracing::warn!(error = %e, "the completed record is not committed yet");
    }
    metrics::histogram!("imagegate_ledger_write_seconds").record(started.elapsed().as_secs_f64());
    metrics::gauge!("imagegate_ledger_queue_depth").set(state.ledger.queue_depth() as f64);
}

/// What relaying an answer observed.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayOutcome {
    /// Image items seen in a successful answer.
    pub images: usize,
    /// The caller stopped reading before the end.
    pub caller_gone: bool,
    /// The upstream body ended cleanly.
    pub complete: bool,
}

/// What is left to give the caller once the record is written.
struct Tail {
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    /// The last chunk of the answer, held back: a caller that knows the length (or reads to
    /// the end) must not see the whole answer before its record is committed.
    last: Option<Bytes>,
}

impl Tail {
    /// Send the held-back chunk and end the caller's body.
    async fn finish(self) {
        if let Some(last) = self.last {
            let _ = self.tx.send(Ok(last)).await;
        }
    }
}

/// Copy the upstream body to the caller, one chunk behind; when the caller is gone keep reading
/// to the end, so the images returned are known.
async fn pump(
    mut body: Incoming,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    count: bool,
) -> (RelayOutcome, Tail) {
    let mut counter = ImageCounter::default();
    let mut outcome = RelayOutcome::default();
    let mut held: Option<Bytes> = None;
    loop {
        match body.frame().await {
            None => {
                outcome.complete = true;
                break;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %error_chain(&e), "upstream body failed");
                if !outcome.caller_gone {
                    if let Some(prev) = held.take() {
                        let _ = tx.send(Ok(prev)).await;
                    }
                    let _ = tx.send(Err(Box::new(e))).await;
                }
                break;
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if count {
                    counter.feed(&data);
                }
                if let Some(prev) = held.replace(data)
                    && !outcome.caller_gone
                    && tx.send(Ok(prev)).await.is_err()
                {
                    outcome.caller_gone = true;
                }
            }
        }
    }
    outcome.images = counter.count;
    // A caller that stopped reading is also gone if it left while the last chunk was held.
    if !outcome.caller_gone && tx.is_closed() {
        outcome.caller_gone = true;
    }
    let last = if outcome.caller_gone { None } else { held };
    (outcome, Tail { tx, last })
}

/// Counts the image items of an OpenAI images answer as it streams by: each item has exactly one
/// `"url"` or `"b64_json"` key, and neither sequence can occur unescaped inside a JSON string.
#[derive(Debug, Default)]
pub struct ImageCounter {
    tail: Vec<u8>,
    pub count: usize,
}

impl ImageCounter {
    const KEYS: [&'static [u8]; 2] = [b"\"url\"", b"\"b64_json\""];
    const KEEP: usize = 9; // longest key minus one

    pub fn feed(&mut self, chunk: &[u8]) {
        // Matches that start in the kept tail and end in this chunk.
        let mut seam = self.tail.clone();
        seam.extend_from_slice(&chunk[..chunk.len().min(Self::KEEP)]);
        let tail_len = self.tail.len();
        for key in Self::KEYS {
            self.count += memchr::memmem::find_iter(&seam, key)
                .filter(|&i| i < tail_len && i + key.len() > tail_len)
                .count();
            self.count += memchr::memmem::find_iter(chunk, key).count();
        }
        // Keep the last KEEP bytes seen.
        if chunk.len() >= Self::KEEP {
            self.tail.clear();
            self.tail
                .extend_from_slice(&chunk[chunk.len() - Self::KEEP..]);
        } else {
            let start = seam.len().saturating_sub(Self::KEEP);
            self.tail = seam.split_off(start);
        }
    }
}

/// The caller-facing body of a relayed answer.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
    remaining: Option<u64>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => {
                if let Some(r) = self.remaining.as_mut() {
                    *r = r.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(http_body::Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.remaining {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_items_across_chunk_seams() {
        let answer = br#"{"created": 1, "data": [{"url": "https://x/1"}, {"url":"https://x/2"}, {"b64_json": "QUJD"}]}"#;
        for split in 0..answer.len() {
            let mut c = ImageCounter::default();
            c.feed(&answer[..split]);
            c.feed(&answer[split..]);
            assert_eq!(c.count, 3, "split at {split}");
        }
        let mut bytewise = ImageCounter::default();
        for b in answer.iter() {
            bytewise.feed(std::slice::from_ref(b));
        }
        assert_eq!(bytewise.count, 3);
    }

    #[test]
    fn escaped_keys_inside_strings_do_not_count() {
        let mut c = ImageCounter::default();
        c.feed(br#"{"data": [{"url": "a\"url\"b", "revised_prompt": "say \"b64_json\""}]}"#);
        assert_eq!(c.count, 1);
    }
}
