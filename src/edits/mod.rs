//! `POST /v1/images/edits` behind authentication and the client limit: the request's phases,
//! one line each, in the order of the contract.
//!
//! ```text
//! content type → read body → parse form → resolve end user → field rules → user limits
//!   → reserve quota → check images → canonical body → forward → relay → settle and record
//! ```
//!
//! Each phase is a function or a small type in its own file here and takes what it needs
//! explicitly ([`Edits`] holds those pieces, built once at start). A phase that refuses returns
//! a [`GatewayError`]; the service turns it into the response. The forward phase hands the
//! request to a task that outlives the connection (see [`forward`]). Every fact learned on the
//! way is written into the request's [`Trail`] for the ledger.

pub mod check_files;
pub mod check_images;
pub mod forward;
pub mod read_body;
pub mod relay;
pub mod reserve;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, header};
use tokio::sync::Semaphore;
use tower::Service;

use crate::body::Body;
use crate::config::ClientConfig;
use crate::edit::canonical;
use crate::edit::form::{self, FormRules};
use crate::edit::png_check::PngRules;
use crate::error::GatewayError;
use crate::ledger::PromptPolicy;
use crate::limits::quota::QuotaStore;
use crate::limits::rate::{RateBackend, RateStatus};
use crate::limits::spec::{MissingUser, UserMismatch};
use crate::limits::{EndUser, resolve_end_user};
use crate::middleware::BoxFuture;
use crate::middleware::auth::Caller;
use crate::middleware::usage::Trail;
use check_images::check_images;
use forward::{Expect, Forwarder};
use read_body::{BodyLimits, BufferBudget, read_body};
use reserve::{Pricing, reserve};

/// How the end user of a request is found.
#[derive(Debug, Clone)]
pub struct EndUserRules {
    pub clients: Arc<[ClientConfig]>,
    pub missing_user: MissingUser,
    pub mismatch: UserMismatch,
    pub max_user_chars: usize,
}

/// What the phases need, built once at start.
pub struct Edits {
    pub body: BodyLimits,
    pub budget: BufferBudget,
    pub form: FormRules,
    pub end_user: EndUserRules,
    pub prompt_policy: PromptPolicy,
    pub rates: Arc<dyn RateBackend>,
    pub quotas: Arc<QuotaStore>,
    pub png: PngRules,
    pub decode_permits: Arc<Semaphore>,
    pub forwarder: Forwarder,
}

#[derive(Clone)]
pub struct EditsService {
    edits: Arc<Edits>,
}

impl EditsService {
    pub fn new(edits: Arc<Edits>) -> Self {
        EditsService { edits }
    }
}

impl<B> Service<Request<B>> for EditsService
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let edits = self.edits.clone();
        Box::pin(async move { Ok(edits.handle(req).await) })
    }
}

/// A request that passed the user limits: the rest of its phases, and the limit status its
/// answer reports in `x-ratelimit-*` whatever the outcome.
struct Admitted {
    rate: RateStatus,
    rest: BoxFuture<Result<Response<Body>, GatewayError>>,
}

impl Edits {
    async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match self.admit(req).await {
            Err((e, rate)) => {
                let mut resp = refusal(e);
                if let Some(rate) = rate {
                    set_rate_headers(resp.headers_mut(), &rate);
                }
                resp
            }
            Ok(admitted) => {
                let mut resp = admitted.rest.await.unwrap_or_else(refusal);
                set_rate_headers(resp.headers_mut(), &admitted.rate);
                resp
            }
        }
    }

    /// The phases up to the user limits, then the rest as one future.
    async fn admit<B>(
        self: Arc<Self>,
        req: Request<B>,
    ) -> Result<Admitted, (GatewayError, Option<RateStatus>)>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let no_rate = |e| (e, None);
        let (caller, trail) = request_context(&req).map_err(no_rate)?;
        let started = std::time::Instant::now();
        // content type (before the body is read)
        let boundary = form::boundary(req.headers().get(header::CONTENT_TYPE)).map_err(no_rate)?;
        // read body
        let (body, held) = read_body(self.body, &self.budget, req)
            .await
            .map_err(no_rate)?;
        // parse form
        let parts = form::parse_parts(&boundary, body, self.form.max_parts)
            .await
            .map_err(no_rate)?;
        // resolve end user: before the field rules only so that the record of a refused request
        // names its end user; its own refusals are reported after the field rules.
        let identity = self.end_user(&caller, form::text_field(&parts, "user").as_deref());
        if let Ok(who) = &identity {
            trail.update(|r| r.user = who.user.clone());
        }
        // field rules
        let mut edit = form::check(parts, &self.form).map_err(no_rate)?;
        trail.update(|r| {
            r.model = Some(edit.model.clone());
            r.n = Some(edit.n);
            r.size = Some(edit.size.as_str().to_owned());
            r.response_format = Some(edit.response_format.as_str().to_owned());
            r.prompt = self.prompt_policy.apply(&edit.prompt);
        });
        let who = identity.map_err(no_rate)?;
        if let Some(user) = &who.user {
            tracing::Span::current().record("user", user.as_str());
        }
        // The normalized id goes upstream, so OpenAI sees the id the gateway charged.
        edit.user = who.user.clone();
        // user limits
        let rate = self
            .rates
            .check_user(&who, edit.n)
            .map_err(|(e, rate)| (e, Some(rate)))?;
        let this = self.clone();
        let rest = Box::pin(async move {
            // reserve quota (before any decoding)
            let n = u32::from(edit.n);
            let each = this.quotas.price(&edit.model, edit.size.as_str(), 1);
            let reservation = reserve(
                &this.quotas,
                &who,
                n,
                each * i64::from(n),
                Pricing::PerImage(each),
            )
            .await?;
            trail.update(|r| r.cost_reserved_micros = reservation.reserved_micros());
            // check images
            let checked = check_images(&this.decode_permits, &this.png, &edit).await;
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
                    // Refund before answering, so the caller's next request sees the quota
                    // restored.
                    reservation.refund().await;
                    return Err(e);
                }
            };
            metrics::histogram!("imagegate_validation_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            // canonical body
            let mut canonical = canonical::encode(&edit, image.bytes, mask.map(|m| m.bytes));
            // The request's bytes stay in the budget until the upstream client drops the body.
            canonical.body = canonical.body.holding(Arc::new(held));
            // forward → relay → settle and record
            this.forwarder
                .forward(canonical, Expect::Images, reservation, trail)
                .await
        });
        Ok(Admitted { rate, rest })
    }

    fn end_user(&self, caller: &Caller, sent: Option<&str>) -> Result<EndUser, GatewayError> {
        let r = &self.end_user;
        resolve_end_user(
            &r.clients[caller.index],
            sent,
            r.missing_user,
            r.mismatch,
            r.max_user_chars,
        )
    }
}

/// The caller (from authentication) and the record (from the usage layer).
fn request_context<B>(req: &Request<B>) -> Result<(Caller, Trail), GatewayError> {
    let caller = req.extensions().get::<Caller>().cloned().ok_or_else(|| {
        tracing::error!("edits service reached without an authenticated caller");
        GatewayError::Internal
    })?;
    let trail = req.extensions().get::<Trail>().cloned().ok_or_else(|| {
        tracing::error!("edits service reached without a usage record");
        GatewayError::Internal
    })?;
    Ok((caller, trail))
}

fn refusal(e: GatewayError) -> Response<Body> {
    let p = e.parts();
    tracing::info!(
        status = p.status.as_u16(),
        code = p.code.unwrap_or("-"),
        param = p.param.as_deref().unwrap_or("-"),
        "request refused"
    );
    e.into_response()
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
