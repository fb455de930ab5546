//! A real hyper server on 127.0.0.1:0 standing in for api.openai.com.
//!
//! It answers dall-e-2 style (`Success`) by default, and GPT-image style (`gpt-image-models.md`
//! §4 JSON, §5 SSE) when the request's `model` starts with `gpt-image` or a `Gpt*` behaviour is
//! set.
//!
//! Serves HTTP/1.1 and h2c (prior knowledge) through hyper-util's auto builder. Every request
//! whose body was read completely is recorded (method, path, headers, body, multipart parts)
//! *before* its response is sent, so once a client has an answer, [`MockUpstream::count`]
//! already includes that request; one whose body broke off is kept apart
//! ([`MockUpstream::aborted`]). `GET /v1/models` is answered apart from the edits behaviour,
//! by [`ModelsAnswer`] (see [`MockUpstream::set_models`]). Dropping the [`MockUpstream`] aborts the accept loop and
//! every connection task and releases all hanging handlers, so calls stuck on it end.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::Stream;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// How the mock answers the requests that arrive after [`MockUpstream::set_behavior`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Behavior {
    /// 200 `{"created": <unix secs>, "data": [...]}` with `n` items (the received `n` field,
    /// default 1, clamped to 1..=100). Items are `{"url": "https://example.invalid/img-<i>.png"}`
    /// or, when `response_format=b64_json`, `{"b64_json": "<base64 of a tiny PNG>"}`.
    /// Headers (also on `Status` and `SlowBody` answers): content-type application/json,
    /// x-request-id `req_mock_<k>` (k counts answers from 1), openai-processing-ms 123,
    /// openai-version 2020-10-01, openai-organization org-mock, x-ratelimit-limit-requests 50,
    /// x-ratelimit-remaining-requests 49, x-ratelimit-reset-requests 1.2s, and on HTTP/1.x
    /// only the hop-by-hop trouble makers connection: keep-alive, keep-alive: timeout=5,
    /// proxy-connection: x (HTTP/2 forbids them).
    ///
    /// When the request's `model` (multipart field or JSON key, see [`Recorded::param`]) starts
    /// with `gpt-image`, answers as [`Behavior::GptStream`] if its `stream` is `true`, else as
    /// [`Behavior::GptJson`].
    #[default]
    Success,
    /// Like `Success` but with exactly this many items (whatever `n` said).
    FewerImages(usize),
    /// Reads and records the request, answers `status` with `body` verbatim as
    /// `application/json`, with the same OpenAI headers as `Success`.
    Status { status: u16, body: String },
    /// Reads and records the whole request, then never answers (until the mock is dropped).
    Hang,
    /// Extra: reads and records the whole request, then holds its answer until
    /// [`MockUpstream::release`] is called, then answers as `Success`.
    Held,
    /// Accepts the request head but never reads the body nor answers. Not recorded in
    /// `received()` (the body never arrives); counted by [`MockUpstream::heads`].
    HangBeforeReading,
    /// Extra: answers `status` with `body` (`application/json`, the OpenAI headers) as soon
    /// as the request head arrives, without reading the body (an upstream refusing a request
    /// on its headers, e.g. a 401). Not recorded in `received()`; counted by `heads()`.
    AnswerUnread { status: u16, body: String },
    /// Like `Success`, but the JSON body (no content-length, chunked on HTTP/1.1) is sent in
    /// `chunks` pieces (at most one per byte), yielding to the scheduler between pieces
    /// (same mechanism as `tokio::task::yield_now`; no sleeps).
    SlowBody { chunks: usize },
    /// Extra: reads and records the request, answers exactly this status, these headers and
    /// this body (content-length added by hyper), nothing else added.
    Custom {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// GPT-image JSON answer (§4), headers as `Success` (content-length set):
    /// `{"created", "data": [n × {"b64_json": <tiny PNG>}], "background", "output_format",
    /// "quality", "size", ["safety_identifier",] "usage"}` with `n` from the request (default 1,
    /// clamped to 1..=10) and the usage of [`gpt_json_usage`]`(n)`. Resolved fields: `background`
    /// `transparent` if asked, else `opaque`; `output_format` as asked, else `png`; `quality` as
    /// asked unless absent or `auto` (then `high`); `size` as asked unless absent or `auto`
    /// (then `1536x1024`); `safety_identifier` = the request's `safety_identifier`, else `user`,
    /// when non-empty.
    GptJson,
    /// `GptJson` without the `usage` key.
    GptJsonNoUsage,
    /// GPT-image SSE answer (§5): `content-type: text/event-stream`, the other `Success`
    /// headers, no content-length (chunked on HTTP/1.1). `partial_images` (from the request,
    /// clamped to 0..=3) `image_edit.partial_image` events, then one `image_edit.completed`
    /// event per image (`n` as in `GptJson`), each with the usage of [`GPT_STREAM_USAGE`]. Each
    /// event is sent as three chunks (cut inside its `data:` line), with a scheduler yield
    /// between chunks. Event fields echo the request (`quality`/`background` default `auto`).
    GptStream,
    /// `GptStream` whose completed events carry no `usage`.
    GptStreamNoUsage,
    /// `GptStream` that breaks: the partial events, then the first half of the first completed
    /// event, then the response body fails (HTTP/1.1: the connection closes without the last
    /// chunk; HTTP/2: the stream is reset).
    GptStreamBroken,
    /// Extra (benchmarks): a GPT-image SSE answer paced in real time: `partials`
    /// `image_edit.partial_image` events, then one `image_edit.completed` event with the usage
    /// of [`GPT_STREAM_USAGE`], each event one chunk, with a `pause_ms` sleep (tokio timer)
    /// before every event but the first. Each event's `b64_json` is `b64_len` (rounded down to
    /// a multiple of 4) `A` characters, and its JSON data ends with `"mock_sent_us"`: the
    /// [`mock_clock_us`] read after the event was built, when the body hands it to hyper (so
    /// right before it is written). Headers as `GptStream`; the request's fields are not echoed.
    GptStreamTimed {
        partials: usize,
        pause_ms: u64,
        b64_len: usize,
    },
    /// Extra (faults): like `Success`, but the head and the first half of the JSON body (no
    /// content-length) are sent, then the body fails: the connection is aborted (HTTP/1.1) or
    /// the stream reset (HTTP/2).
    BreakMidBody,
    /// Extra (faults): like `Success`, but after the head and the first half of the JSON body
    /// nothing more is sent (until the mock is dropped).
    StallMidBody,
    /// Extra (faults): like `Success`, answered only `delay_ms` (tokio timer) after the request
    /// was read and recorded.
    SlowHead { delay_ms: u64 },
}

impl Behavior {
    /// Extra: `Status` with an OpenAI error envelope
    /// `{"error":{"message","type","param","code"}}` (`param`/`code` become `null` when `None`).
    pub fn openai_error(
        status: u16,
        message: &str,
        kind: &str,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Behavior {
        Behavior::Status {
            status,
            body: openai_error_body(message, kind, param, code),
        }
    }
}

/// Extra: the OpenAI error envelope as a JSON string.
pub fn openai_error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> String {
    serde_json::json!({
        "error": { "message": message, "type": kind, "param": param, "code": code }
    })
    .to_string()
}

/// The fixed usage of a `GptJson` answer with `n` images: the §4 figures with the output
/// scaled by `n`: input 1060 (60 text + 1000 image), output 2000·n, total 1060 + 2000·n. At
/// gpt-image-2 list prices it costs 8,300 + 60,000·n µ$ (68,300 for n = 1).
pub fn gpt_json_usage(n: usize) -> serde_json::Value {
    let out = 2000 * n as u64;
    serde_json::json!({
        "input_tokens": 1060,
        "input_tokens_details": { "text_tokens": 60, "image_tokens": 1000 },
        "output_tokens": out,
        "output_tokens_details": { "image_tokens": out, "text_tokens": 0 },
        "total_tokens": 1060 + out
    })
}

/// µ$ of [`gpt_json_usage`]`(n)` at gpt-image-2 list prices.
pub fn gpt_json_cost_micros(n: usize) -> u64 {
    8_300 + 60_000 * n as u64
}

/// The usage of every `GptStream` completed event (§5 example): 50 input (10 text + 40 image),
/// 50 output, total 100. At gpt-image-2 list prices: 50 + 320 + 1,500 = 1,870 µ$ per event.
pub const GPT_STREAM_USAGE: &str = r#"{"total_tokens":100,"input_tokens":50,"output_tokens":50,"input_tokens_details":{"text_tokens":10,"image_tokens":40}}"#;

/// µ$ of one [`GPT_STREAM_USAGE`] at gpt-image-2 list prices.
pub const GPT_STREAM_EVENT_COST_MICROS: u64 = 1_870;
/// Extra: how the mock answers `GET /v1/models` (whatever the edits [`Behavior`] is). Those
/// requests are recorded like any other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelsAnswer {
    /// 200 `{"object":"list","data":[...]}`, one model object per `(id, shutdown_date)`
    /// (`null` when `None`), with the OpenAI headers of `Success`.
    Listing(Vec<(String, Option<String>)>),
    /// This status and this body verbatim as `application/json`, with the OpenAI headers.
    Status { status: u16, body: String },
}

impl Default for ModelsAnswer {
    /// The live OpenAI models of `gpt-image-models.md` §1 on 2026-12-01, none with a date.
    fn default() -> Self {
        ModelsAnswer::Listing(
            [
                "gpt-image-2",
                "gpt-image-2-2026-04-21",
                "gpt-image-2.5-flare",
                "gpt-image-2.5-flare-2026-09-08",
                "gpt-image-2.5-sunburst",
                "gpt-image-2.5-sunburst-2026-09-08",
                "gpt-image-2.6-flare",
                "gpt-image-2.6-sunburst",
            ]
            .into_iter()
            .map(|id| (id.to_string(), None))
            .collect(),
        )
    }
}

impl ModelsAnswer {
    /// Extra: a listing from `(id, shutdown_date)` pairs.
    pub fn listing(models: &[(&str, Option<&str>)]) -> ModelsAnswer {
        ModelsAnswer::Listing(
            models
                .iter()
                .map(|(id, d)| (id.to_string(), d.map(str::to_string)))
                .collect(),
        )
    }

    fn answer(&self) -> (StatusCode, String) {
        match self {
            ModelsAnswer::Listing(models) => {
                let data: Vec<serde_json::Value> = models
                    .iter()
                    .map(|(id, d)| {
                        serde_json::json!({
                            "id": id, "object": "model", "created": 1_745_193_600,
                            "owned_by": "system", "shutdown_date": d
                        })
                    })
                    .collect();
                (
                    StatusCode::OK,
                    serde_json::json!({ "object": "list", "data": data }).to_string(),
                )
            }
            ModelsAnswer::Status { status, body } => (
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body.clone(),
            ),
        }
    }
}

/// One multipart part as parsed by multer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub data: Bytes,
}

/// One request that the mock received completely.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    /// The URI path only (e.g. `/v1/images/edits`); see `query`.
    pub path: String,
    /// Extra: the query string, if any.
    pub query: Option<String>,
    /// Extra: HTTP version the request came in with (HTTP/1.1 or HTTP/2).
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Parts in wire order; empty when the body was not parseable multipart/form-data.
    pub parts: Vec<Part>,
    /// Extra: the body as JSON when the content type is `application/json` and the body
    /// parses; `None` otherwise.
    pub json: Option<serde_json::Value>,
}

impl Recorded {
    /// The first part named `name`, as (lossy) UTF-8 text.
    pub fn field(&self, name: &str) -> Option<String> {
        self.part(name)
            .map(|p| String::from_utf8_lossy(&p.data).into_owned())
    }

    /// The first part named `name`.
    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// Part names in wire order (duplicates kept).
    pub fn field_names(&self) -> Vec<String> {
        self.parts.iter().map(|p| p.name.clone()).collect()
    }

    /// Extra: a request parameter whatever the encoding: the multipart field `name`, else the
    /// top-level JSON key `name` (strings as they are, other values as compact JSON: `2`,
    /// `true`, `null`).
    pub fn param(&self, name: &str) -> Option<String> {
        if let Some(v) = self.field(name) {
            return Some(v);
        }
        match self.json.as_ref()?.get(name)? {
            serde_json::Value::String(s) => Some(s.clone()),
            v => Some(v.to_string()),
        }
    }

    /// Extra: a request header as (lossy) text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// Extra: a request whose body broke off before its end (the client aborted it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aborted {
    /// The request's `content-length`, if it had one.
    pub content_length: Option<usize>,
    /// Body bytes received before the body failed.
    pub received: usize,
}

struct Shared {
    recorded: Mutex<Vec<Recorded>>,
    aborted: Mutex<Vec<Aborted>>,
    aborted_tx: watch::Sender<usize>,
    /// The most body bytes any request had received so far (complete or not).
    progress_tx: watch::Sender<usize>,
    count_tx: watch::Sender<usize>,
    heads_tx: watch::Sender<usize>,
    behavior: Mutex<Behavior>,
    /// `Held` answers wait for it to be true.
    released: watch::Sender<bool>,
    models: Mutex<ModelsAnswer>,
    responses: AtomicU64,
    connections: AtomicUsize,
    /// Its sender lives in `MockUpstream`; it closes when the mock is dropped.
    shutdown_rx: watch::Receiver<()>,
}

pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    _shutdown_tx: watch::Sender<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task;
        // dropping `_shutdown_tx` (right after) releases handlers parked in HTTP/2 stream tasks.
        self.accept.abort();
    }
}

impl MockUpstream {
    /// Binds 127.0.0.1:0 and spawns the accept loop on the current tokio runtime.
    pub async fn start() -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock upstream: bind");
        let addr = listener.local_addr().expect("mock upstream: local_addr");
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let shared = Arc::new(Shared {
            recorded: Mutex::new(Vec::new()),
            aborted: Mutex::new(Vec::new()),
            aborted_tx: watch::Sender::new(0),
            progress_tx: watch::Sender::new(0),
            count_tx: watch::Sender::new(0),
            heads_tx: watch::Sender::new(0),
            behavior: Mutex::new(Behavior::Success),
            released: watch::Sender::new(false),
            models: Mutex::new(ModelsAnswer::default()),
            responses: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            shutdown_rx,
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        MockUpstream {
            addr,
            shared,
            accept,
            _shutdown_tx: shutdown_tx,
        }
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request fully received so far, in arrival order.
    pub fn received(&self) -> Vec<Recorded> {
        self.shared.recorded.lock().unwrap().clone()
    }

    /// Extra: the last request fully received, if any.
    pub fn last(&self) -> Option<Recorded> {
        self.shared.recorded.lock().unwrap().last().cloned()
    }

    pub fn count(&self) -> usize {
        self.shared.recorded.lock().unwrap().len()
    }

    /// Resolves once at least `n` requests were fully received (no polling).
    pub async fn wait_for(&self, n: usize) {
        let mut rx = self.shared.count_tx.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Extra: the requests whose body broke off before its end (not in `received()`), in the
    /// order they failed.
    pub fn aborted(&self) -> Vec<Aborted> {
        self.shared.aborted.lock().unwrap().clone()
    }

    /// Extra: resolves once at least `n` request bodies broke off (no polling).
    pub async fn wait_for_aborted(&self, n: usize) {
        let mut rx = self.shared.aborted_tx.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Extra: resolves once some request's body has delivered at least `n` bytes so far,
    /// complete or not (no polling).
    pub async fn wait_for_body_bytes(&self, n: usize) {
        let mut rx = self.shared.progress_tx.subscribe();
        let _ = rx.wait_for(|most| *most >= n).await;
    }

    /// Extra: number of request heads seen (every request, including `HangBeforeReading`
    /// ones and ones whose body never completed).
    pub fn heads(&self) -> usize {
        *self.shared.heads_tx.borrow()
    }

    /// Extra: resolves once at least `n` request heads were seen.
    pub async fn wait_for_heads(&self, n: usize) {
        let mut rx = self.shared.heads_tx.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Extra: number of TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Sets the behaviour for all following requests (a request uses the behaviour in force
    /// when its head arrived). Panics on an invalid status code.
    pub fn set_behavior(&self, b: Behavior) {
        if let Behavior::Status { status, .. }
        | Behavior::Custom { status, .. }
        | Behavior::AnswerUnread { status, .. } = &b
        {
            StatusCode::from_u16(*status).expect("set_behavior: invalid status code");
        }
        if let Behavior::Custom { headers, .. } = &b {
            for (k, v) in headers {
                HeaderName::from_bytes(k.as_bytes()).expect("set_behavior: bad header name");
                HeaderValue::from_str(v).expect("set_behavior: bad header value");
            }
        }
        *self.shared.behavior.lock().unwrap() = b;
    }

    /// Extra: how the following `GET /v1/models` requests are answered.
    pub fn set_models(&self, answer: ModelsAnswer) {
        *self.shared.models.lock().unwrap() = answer;
    }

    /// Extra: forgets every recorded request ([`MockUpstream::count`] restarts from 0), so long
    /// benchmark loops do not keep every body they sent.
    pub fn clear_received(&self) {
        let mut recorded = self.shared.recorded.lock().unwrap();
        recorded.clear();
        self.shared.count_tx.send_replace(0);
    }

    /// Extra: lets every `Held` answer go (those waiting and those to come).
    pub fn release(&self) {
        self.shared.released.send_replace(true);
    }

    /// Extra: the behaviour currently in force.
    pub fn behavior(&self) -> Behavior {
        self.shared.behavior.lock().unwrap().clone()
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    conns.spawn(serve(stream, shared.clone()));
                }
                Err(_) => tokio::task::yield_now().await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let svc = service_fn(move |req| handle(req, shared.clone()));
    let builder = auto::Builder::new(TokioExecutor::new());
    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
}

async fn wait_shutdown(shared: &Shared) -> std::io::Error {
    let mut rx = shared.shutdown_rx.clone();
    // Never changes; resolves with Err once the sender (in MockUpstream) is dropped.
    while rx.changed().await.is_ok() {}
    std::io::Error::other("mock upstream shut down")
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<MockBody>, std::io::Error> {
    shared.heads_tx.send_modify(|n| *n += 1);
    if req.method() == Method::GET && req.uri().path() == "/v1/models" {
        return models(req, &shared).await;
    }
    let behavior = shared.behavior.lock().unwrap().clone();
    if let Behavior::AnswerUnread { status, body } = behavior {
        let id = shared.responses.fetch_add(1, Ordering::SeqCst) + 1;
        let mut resp = Response::new(MockBody::full(body));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        openai_headers(resp.headers_mut(), id, req.version());
        return Ok(resp);
    }
    if behavior == Behavior::HangBeforeReading {
        let _unread = req; // keep the request and its unread body alive
        return Err(wait_shutdown(&shared).await);
    }

    let (head, mut body) = req.into_parts();
    let mut received = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    received.extend_from_slice(&data);
                    let n = received.len();
                    shared.progress_tx.send_if_modified(|most| {
                        let more = n > *most;
                        *most = (*most).max(n);
                        more
                    });
                }
            }
            Err(e) => {
                let content_length = head
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                shared.aborted.lock().unwrap().push(Aborted {
                    content_length,
                    received: received.len(),
                });
                shared.aborted_tx.send_modify(|n| *n += 1);
                return Err(std::io::Error::other(e));
            }
        }
    }
    let body = Bytes::from(received);
    let parts = parse_multipart(&head.headers, &body).await;
    let json = parse_json(&head.headers, &body);
    let rec = Recorded {
        method: head.method,
        path: head.uri.path().to_string(),
        query: head.uri.query().map(str::to_string),
        version: head.version,
        headers: head.headers,
        body,
        parts,
        json,
    };

    // `Success` answers GPT-image models in their own way.
    let behavior = match behavior {
        Behavior::Success
            if rec
                .param("model")
                .is_some_and(|m| m.starts_with("gpt-image")) =>
        {
            if rec.param("stream").as_deref() == Some("true") {
                Behavior::GptStream
            } else {
                Behavior::GptJson
            }
        }
        b => b,
    };
    let gpt = GptAnswer::of(&rec);

    let items = match &behavior {
        Behavior::FewerImages(k) => *k,
        _ => rec
            .field("n")
            .and_then(|s| s.trim().parse::<i64>().ok())
            .map(|n| n.clamp(1, 100) as usize)
            .unwrap_or(1),
    };
    let b64 = rec.field("response_format").as_deref() == Some("b64_json");
    let version = rec.version;

    {
        let mut recorded = shared.recorded.lock().unwrap();
        recorded.push(rec);
        let len = recorded.len();
        shared.count_tx.send_replace(len);
    }

    if let Behavior::SlowHead { delay_ms } = behavior {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
    if behavior == Behavior::Held {
        let mut released = shared.released.subscribe();
        let _ = released.wait_for(|r| *r).await;
    }
    let id = shared.responses.fetch_add(1, Ordering::SeqCst) + 1;
    let (status, body, extra) = match behavior {
        Behavior::Hang => return Err(wait_shutdown(&shared).await),
        Behavior::SlowHead { .. } => (
            StatusCode::OK,
            MockBody::full(success_json(items, b64)),
            true,
        ),
        Behavior::BreakMidBody | Behavior::StallMidBody => {
            let json = Bytes::from(success_json(items, b64));
            let half = json.slice(..json.len() / 2);
            let mut body = MockBody::pieces(vec![half], behavior == Behavior::BreakMidBody);
            body.stall_at_end = behavior == Behavior::StallMidBody;
            (StatusCode::OK, body, true)
        }
        Behavior::HangBeforeReading | Behavior::AnswerUnread { .. } => unreachable!(),
        Behavior::Success | Behavior::FewerImages(_) | Behavior::Held => (
            StatusCode::OK,
            MockBody::full(success_json(items, b64)),
            true,
        ),
        Behavior::SlowBody { chunks } => (
            StatusCode::OK,
            MockBody::chunked(success_json(items, b64), chunks),
            true,
        ),
        Behavior::Status { status, body } => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            MockBody::full(body),
            true,
        ),
        Behavior::GptJson | Behavior::GptJsonNoUsage => (
            StatusCode::OK,
            MockBody::full(gpt.json(behavior == Behavior::GptJson)),
            true,
        ),
        Behavior::GptStream | Behavior::GptStreamNoUsage | Behavior::GptStreamBroken => {
            let broken = behavior == Behavior::GptStreamBroken;
            let events = gpt.events(behavior != Behavior::GptStreamNoUsage);
            let mut chunks = Vec::new();
            for (i, event) in events.iter().enumerate() {
                if broken && i == gpt.partials {
                    // Half of the first completed event, then the body fails.
                    let half = Bytes::from(event.clone()).slice(..event.len() / 2);
                    chunks.extend(three_pieces(half));
                    break;
                }
                chunks.extend(three_pieces(Bytes::from(event.clone())));
            }
            let mut resp = Response::new(MockBody::pieces(chunks, broken));
            openai_headers(resp.headers_mut(), id, version);
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            return Ok(resp);
        }
        Behavior::GptStreamTimed {
            partials,
            pause_ms,
            b64_len,
        } => {
            let events = timed_events(partials, Duration::from_millis(pause_ms), b64_len);
            let mut resp = Response::new(MockBody::timed(events));
            openai_headers(resp.headers_mut(), id, version);
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            return Ok(resp);
        }
        Behavior::Custom {
            status,
            headers,
            body,
        } => {
            let mut resp = Response::new(MockBody::full(body));
            *resp.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(&v),
                ) {
                    resp.headers_mut().append(k, v);
                }
            }
            return Ok(resp);
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if extra {
        openai_headers(resp.headers_mut(), id, version);
    }
    Ok(resp)
}

/// `GET /v1/models`: recorded, then answered by the [`ModelsAnswer`] in force.
async fn models(
    req: Request<Incoming>,
    shared: &Shared,
) -> Result<Response<MockBody>, std::io::Error> {
    let answer = shared.models.lock().unwrap().clone();
    let (head, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let version = head.version;
    {
        let mut recorded = shared.recorded.lock().unwrap();
        recorded.push(Recorded {
            method: head.method,
            path: head.uri.path().to_string(),
            query: head.uri.query().map(str::to_string),
            version,
            headers: head.headers,
            body,
            parts: Vec::new(),
            json: None,
        });
        let len = recorded.len();
        shared.count_tx.send_replace(len);
    }
    let id = shared.responses.fetch_add(1, Ordering::SeqCst) + 1;
    let (status, body) = answer.answer();
    let mut resp = Response::new(MockBody::full(body));
    *resp.status_mut() = status;
    openai_headers(resp.headers_mut(), id, version);
    Ok(resp)
}

/// The headers of `Success` / `Status` / `SlowBody` answers.
fn openai_headers(h: &mut HeaderMap, id: u64, version: Version) {
    let mut put = |k: &'static str, v: String| {
        h.insert(k, HeaderValue::from_str(&v).expect("header value"));
    };
    put("content-type", "application/json".into());
    put("x-request-id", format!("req_mock_{id}"));
    put("openai-processing-ms", "123".into());
    put("openai-version", "2020-10-01".into());
    put("openai-organization", "org-mock".into());
    put("x-ratelimit-limit-requests", "50".into());
    put("x-ratelimit-remaining-requests", "49".into());
    put("x-ratelimit-reset-requests", "1.2s".into());
    // Hop-by-hop trouble makers the gateway must strip. HTTP/2 forbids them (hyper would
    // drop them anyway), so they are only sent on HTTP/1.x.
    if version < Version::HTTP_2 {
        put("connection", "keep-alive".into());
        put("keep-alive", "timeout=5".into());
        put("proxy-connection", "x".into());
    }
}

/// What a GPT-image answer echoes of its request.
struct GptAnswer {
    n: usize,
    partials: usize,
    background: Option<String>,
    output_format: Option<String>,
    quality: Option<String>,
    size: Option<String>,
    safety_identifier: Option<String>,
}

impl GptAnswer {
    fn of(rec: &Recorded) -> GptAnswer {
        let int = |name: &str, lo: i64, hi: i64, default: i64| {
            rec.param(name)
                .and_then(|s| s.trim().parse::<i64>().ok())
                .unwrap_or(default)
                .clamp(lo, hi) as usize
        };
        let text = |name: &str| rec.param(name).filter(|s| !s.is_empty() && s != "null");
        GptAnswer {
            n: int("n", 1, 10, 1),
            partials: int("partial_images", 0, 3, 0),
            background: text("background"),
            output_format: text("output_format"),
            quality: text("quality"),
            size: text("size"),
            safety_identifier: text("safety_identifier").or_else(|| text("user")),
        }
    }

    fn format(&self) -> &str {
        self.output_format.as_deref().unwrap_or("png")
    }

    /// The §4 body.
    fn json(&self, usage: bool) -> String {
        let data: Vec<serde_json::Value> = (0..self.n)
            .map(|_| serde_json::json!({ "b64_json": base64(&tiny_png()) }))
            .collect();
        let background = if self.background.as_deref() == Some("transparent") {
            "transparent"
        } else {
            "opaque"
        };
        let quality = match self.quality.as_deref() {
            None | Some("auto") => "high",
            Some(q) => q,
        };
        let size = match self.size.as_deref() {
            None | Some("auto") => "1536x1024",
            Some(s) => s,
        };
        let mut body = serde_json::json!({
            "created": unix_now(),
            "data": data,
            "background": background,
            "output_format": self.format(),
            "quality": quality,
            "size": size,
        });
        if let Some(id) = &self.safety_identifier {
            body["safety_identifier"] = id.as_str().into();
        }
        if usage {
            body["usage"] = gpt_json_usage(self.n);
        }
        body.to_string()
    }

    /// The §5 events, each with its blank line: the partials, then one completed per image.
    fn events(&self, usage: bool) -> Vec<String> {
        let common = |kind: &str| {
            serde_json::json!({
                "type": kind,
                "b64_json": base64(&tiny_png()),
                "created_at": unix_now(),
                "size": self.size.as_deref().unwrap_or("auto"),
                "quality": self.quality.as_deref().unwrap_or("auto"),
                "background": self.background.as_deref().unwrap_or("auto"),
                "output_format": self.format(),
            })
        };
        let mut out = Vec::new();
        for i in 0..self.partials {
            let mut e = common("image_edit.partial_image");
            e["partial_image_index"] = i.into();
            out.push(format!("event: image_edit.partial_image\ndata: {e}\n\n"));
        }
        for _ in 0..self.n {
            let mut e = common("image_edit.completed");
            if usage {
                e["usage"] = serde_json::from_str(GPT_STREAM_USAGE).expect("usage JSON");
            }
            e["safety_identifier"] = self.safety_identifier.as_deref().into();
            out.push(format!("event: image_edit.completed\ndata: {e}\n\n"));
        }
        out
    }
}

/// Extra: microseconds on a monotonic clock shared by the whole process (its zero is the first
/// call), as written in the `mock_sent_us` field of [`Behavior::GptStreamTimed`] events.
pub fn mock_clock_us() -> u64 {
    static ZERO: OnceLock<Instant> = OnceLock::new();
    ZERO.get_or_init(Instant::now).elapsed().as_micros() as u64
}

type EventStream = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

/// The events of [`Behavior::GptStreamTimed`], each built (and stamped) when polled.
fn timed_events(partials: usize, pause: Duration, b64_len: usize) -> EventStream {
    let b64: Arc<str> = "A".repeat(b64_len / 4 * 4).into();
    mock_clock_us(); // start the clock before the first stamp
    Box::pin(futures_util::stream::unfold(0usize, move |i| {
        let b64 = b64.clone();
        async move {
            if i > partials {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            let kind = if i < partials {
                "image_edit.partial_image"
            } else {
                "image_edit.completed"
            };
            let mut e = String::with_capacity(b64.len() + 512);
            e.push_str(&format!(
                "event: {kind}\ndata: {{\"type\":\"{kind}\",\"b64_json\":\""
            ));
            e.push_str(&b64);
            e.push_str(&format!(
                "\",\"created_at\":{},\"size\":\"1024x1024\",\"quality\":\"low\",\"background\":\"opaque\",\"output_format\":\"png\",",
                unix_now()
            ));
            if i < partials {
                e.push_str(&format!("\"partial_image_index\":{i},"));
            } else {
                e.push_str(&format!("\"usage\":{GPT_STREAM_USAGE},"));
            }
            e.push_str(&format!("\"mock_sent_us\":{}}}\n\n", mock_clock_us()));
            Some((Bytes::from(e), i + 1))
        }
    }))
}

/// Three pieces: the first ends 4 bytes into the `data:` line, the second in the middle of what
/// is left (at most one piece per byte).
fn three_pieces(b: Bytes) -> Vec<Bytes> {
    let a = memchr_data(&b).map_or(b.len() / 3, |d| d + 4).min(b.len());
    let m = a + (b.len() - a) / 2;
    [b.slice(..a), b.slice(a..m), b.slice(m..)]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect()
}

fn memchr_data(b: &[u8]) -> Option<usize> {
    b.windows(5).position(|w| w == b"data:")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn parse_json(headers: &HeaderMap, body: &Bytes) -> Option<serde_json::Value> {
    let ct = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = ct.split(';').next()?.trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return None;
    }
    serde_json::from_slice(body).ok()
}

fn success_json(items: usize, b64: bool) -> String {
    let created = unix_now();
    let data: Vec<serde_json::Value> = (0..items)
        .map(|i| {
            if b64 {
                serde_json::json!({ "b64_json": base64(&tiny_png()) })
            } else {
                serde_json::json!({ "url": format!("https://example.invalid/img-{i}.png") })
            }
        })
        .collect();
    serde_json::json!({ "created": created, "data": data }).to_string()
}

/// The image behind every `b64_json` item: a 2x2 RGBA PNG.
pub fn tiny_png() -> Vec<u8> {
    super::fixtures::rgba_png(2, true)
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            ALPHABET[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

async fn parse_multipart(headers: &HeaderMap, body: &Bytes) -> Vec<Part> {
    let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return Vec::new();
    };
    let Ok(boundary) = multer::parse_boundary(ct) else {
        return Vec::new();
    };
    let stream = Full::new(body.clone()).into_data_stream();
    let mut mp = multer::Multipart::new(stream, boundary);
    let mut out = Vec::new();
    loop {
        match mp.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_string();
                let file_name = field.file_name().map(str::to_string);
                let content_type = field.content_type().map(|m| m.to_string());
                match field.bytes().await {
                    Ok(data) => out.push(Part {
                        name,
                        file_name,
                        content_type,
                        data,
                    }),
                    Err(_) => return Vec::new(),
                }
            }
            Ok(None) => return out,
            Err(_) => return Vec::new(),
        }
    }
}

/// Response body: whole, or in pieces with a scheduler yield between them; optionally failing
/// after its last piece (the connection or stream is then aborted).
pub struct MockBody {
    chunks: VecDeque<Bytes>,
    exact_len: Option<u64>,
    slow: bool,
    yield_next: bool,
    fail_at_end: bool,
    /// After the last piece, never end (nor wake).
    stall_at_end: bool,
    /// Events produced on demand (then `chunks` is empty).
    timed: Option<EventStream>,
}

impl MockBody {
    fn full(s: String) -> Self {
        let b = Bytes::from(s);
        MockBody {
            exact_len: Some(b.len() as u64),
            chunks: VecDeque::from([b]),
            slow: false,
            yield_next: false,
            fail_at_end: false,
            stall_at_end: false,
            timed: None,
        }
    }

    /// These pieces, with a yield between them, no length; fails after them if `fail_at_end`.
    fn pieces(chunks: Vec<Bytes>, fail_at_end: bool) -> Self {
        MockBody {
            chunks: chunks.into(),
            exact_len: None,
            slow: true,
            yield_next: false,
            fail_at_end,
            stall_at_end: false,
            timed: None,
        }
    }

    /// The items of `events` as they come, no length.
    fn timed(events: EventStream) -> Self {
        MockBody {
            chunks: VecDeque::new(),
            exact_len: None,
            slow: false,
            yield_next: false,
            fail_at_end: false,
            stall_at_end: false,
            timed: Some(events),
        }
    }

    fn chunked(s: String, pieces: usize) -> Self {
        let b = Bytes::from(s);
        let pieces = pieces.clamp(1, b.len().max(1));
        let size = b.len().div_ceil(pieces).max(1);
        let mut chunks = VecDeque::new();
        let mut start = 0;
        while start < b.len() {
            let end = (start + size).min(b.len());
            chunks.push_back(b.slice(start..end));
            start = end;
        }
        MockBody {
            chunks,
            exact_len: None,
            slow: true,
            yield_next: false,
            fail_at_end: false,
            stall_at_end: false,
            timed: None,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if let Some(events) = this.timed.as_mut() {
            return events
                .as_mut()
                .poll_next(cx)
                .map(|e| e.map(|b| Ok(Frame::data(b))));
        }
        if this.yield_next {
            // Equivalent of tokio::task::yield_now(): reschedule, let others run.
            this.yield_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match this.chunks.pop_front() {
            Some(c) => {
                this.yield_next =
                    this.slow && (!this.chunks.is_empty() || this.fail_at_end || this.stall_at_end);
                Poll::Ready(Some(Ok(Frame::data(c))))
            }
            None if this.fail_at_end => {
                this.fail_at_end = false;
                Poll::Ready(Some(Err(std::io::Error::other(
                    "mock upstream: stream broken on purpose",
                ))))
            }
            // Parked for good: nothing will wake this body (the mock's drop aborts its task).
            None if this.stall_at_end => Poll::Pending,
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.timed.is_none() && self.chunks.is_empty() && !self.fail_at_end && !self.stall_at_end
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact_len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
