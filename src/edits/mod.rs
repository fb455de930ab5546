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
pub mod cut_through;
pub mod decode_pool;
pub mod forward;
pub mod gpt;
pub mod read_body;
pub mod relay;
pub mod reserve;
pub mod validated;

use check_images::note_files;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, header};
use tokio::sync::Semaphore;
use tower::Service;

use crate::BoxFuture;
use crate::body::Body;
use crate::clock::Clock;
use crate::config::ClientConfig;
use crate::edit::canonical;
use crate::edit::files::FileRules;
use crate::edit::form::{self, FormRules};
use crate::edit::gpt as gpt_form;
use crate::edit::png_check::PngRules;
use crate::error::GatewayError;
use crate::extensions::Caller;
use crate::ledger::PromptPolicy;
use crate::limits::quota::QuotaStore;
use crate::limits::rate::{RateBackend, RateStatus};
use crate::limits::spec::{MissingUser, UserMismatch};
use crate::limits::{EndUser, resolve_end_user};
use crate::pricing::reservation_micros;
use crate::record::Trail;
use check_files::check_files;
use cut_through::{Checking, check_or_start, forward_dall_e_2};
use forward::{Expect, Forwarder};
use read_body::BudgetHold;
use read_body::{BodyLimits, BufferBudget, read_body};
use reserve::{Pricing, ReservationGuard, reserve};

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
    /// The accepted gpt-image models, their rules and prices.
    pub models: Arc<gpt::ModelTable>,
    /// Byte-level checks of gpt-image files.
    pub files: FileRules,
    pub clock: Clock,
    pub decode_permits: Arc<Semaphore>,
    /// Files that passed the checks recently: not decoded again.
    pub validated: Arc<validated::ValidatedCache>,
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

/// A gpt-image body: multipart parts, or JSON.
enum GptInput {
    Parts(Vec<form::RawPart>),
    Json(bytes::Bytes),
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
        let content_type = req.headers().get(header::CONTENT_TYPE);
        if !self.models.serves_gpt_image() {
            // The dall-e-2-only gateway: its content type rule, part caps and field rules.
            let boundary = form::boundary(content_type).map_err(|e| no_rate(e.into()))?;
            let (body, held) = read_body(self.body, &self.budget, req)
                .await
                .map_err(no_rate)?;
            let parts = form::parse_parts(&boundary, body, self.form.max_parts)
                .await
                .map_err(|e| no_rate(e.into()))?;
            return self
                .admit_dall_e_2(caller, trail, parts, held, started)
                .await;
        }
        // content type (before the body is read): multipart or JSON
        let kind = gpt::body_kind(content_type).map_err(no_rate)?;
        // read body
        let (body, held) = read_body(self.body, &self.budget, req)
            .await
            .map_err(no_rate)?;
        // parse form, and choose the profile by the model it names
        let parts = match kind {
            gpt::Body::Json => {
                return self
                    .admit_gpt(caller, trail, GptInput::Json(body), held, started)
                    .await;
            }
            gpt::Body::Multipart(boundary) => {
                let max = self
                    .form
                    .max_parts
                    .max(gpt_form::multipart::max_parts(&self.models.limits));
                form::parse_parts_uncapped(&boundary, body, max)
                    .await
                    .map_err(|e| no_rate(e.into()))?
            }
        };
        if self
            .models
            .is_dall_e_2(form::text_field(&parts, "model").as_deref())
        {
            self.admit_dall_e_2(caller, trail, parts, held, started)
                .await
        } else {
            self.admit_gpt(caller, trail, GptInput::Parts(parts), held, started)
                .await
        }
    }

    /// The dall-e-2 profile's phases from the parsed form.
    async fn admit_dall_e_2(
        self: Arc<Self>,
        caller: Caller,
        trail: Trail,
        parts: Vec<form::RawPart>,
        held: BudgetHold,
        started: std::time::Instant,
    ) -> Result<Admitted, (GatewayError, Option<RateStatus>)> {
        let no_rate = |e| (e, None);
        // resolve end user: before the field rules only so that the record of a refused request
        // names its end user; its own refusals are reported after the field rules.
        let identity = self.end_user(&caller, form::text_field(&parts, "user").as_deref());
        if let Ok(who) = &identity {
            trail.update(|r| r.user = who.user.clone());
        }
        // field rules
        let mut edit = form::check(parts, &self.form).map_err(|e| no_rate(e.into()))?;
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
            .await
            .map_err(|(e, rate)| (e.into(), Some(rate)))?;
        let this = self.clone();
        let rest = Box::pin(async move {
            // reserve quota (before any decoding)
            let n = u32::from(edit.n);
            let each = this.quotas.price(&edit.model, edit.size.as_str(), 1);
            let reservation = this
                .reserve_quota(
                    &trail,
                    &who,
                    n,
                    each * i64::from(n),
                    Pricing::PerImage(each),
                )
                .await?;
            // check images (cut-through: the body goes upstream while they are checked)
            let cut_through = this.forwarder.cut_through;
            let checking = check_or_start(
                &this.decode_permits,
                &this.validated,
                &this.png,
                &edit,
                cut_through,
            );
            let checked = match checking.await {
                Checking::Done(checked) => checked,
                Checking::Running(running) => {
                    // canonical body → forward while checking → relay → settle and record
                    let fwd = &this.forwarder;
                    return forward_dall_e_2(fwd, edit, running, held, reservation, trail, started)
                        .await;
                }
            };
            if let Some((image, mask)) = &checked.digests {
                trail.update(|r| note_files(r, Some(image), mask.as_ref()));
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

    /// The gpt-image profile's phases from the parsed form or the JSON body.
    async fn admit_gpt(
        self: Arc<Self>,
        caller: Caller,
        trail: Trail,
        input: GptInput,
        held: BudgetHold,
        started: std::time::Instant,
    ) -> Result<Admitted, (GatewayError, Option<RateStatus>)> {
        let no_rate = |e| (e, None);
        let models = self.models.on(self
            .clock
            .now_wall()
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .date());
        let limits = &self.models.limits;
        // field rules (model first: a retired or unknown id is answered here, like upstream)
        let edit = match input {
            GptInput::Parts(parts) => {
                let sent_user = form::text_field(&parts, "safety_identifier")
                    .filter(|s| !s.is_empty())
                    .or_else(|| form::text_field(&parts, "user"));
                // Named in the record of a refused request too.
                if let Ok(who) = self.end_user(&caller, sent_user.as_deref()) {
                    trail.update(|r| r.user = who.user.clone());
                }
                gpt_form::multipart::check_multipart(parts, &models, limits)
            }
            GptInput::Json(body) => gpt_form::json::parse_json(&body, &models, limits),
        };
        let mut edit = edit.map_err(no_rate)?;
        trail.update(|r| {
            r.model = Some(edit.model.clone());
            r.n = Some(edit.n_or_default());
            r.size = edit.size_str();
            r.quality = edit.quality.clone();
            r.output_format = edit.output_format_str().map(str::to_owned);
            r.input_images = Some(edit.input_image_count() as u32);
            r.stream = Some(edit.is_stream());
            r.prompt = self.prompt_policy.apply(&edit.prompt);
        });
        // resolve end user (U1: safety_identifier, else user)
        let who = self.end_user(&caller, edit.end_user()).map_err(no_rate)?;
        trail.update(|r| r.user = who.user.clone());
        if let Some(user) = &who.user {
            tracing::Span::current().record("user", user.as_str());
            // A personal key's own user replaces another name (policy `overwrite`), so OpenAI
            // sees the id the gateway charged; an app's ids go upstream as sent.
            if edit.end_user().map(str::trim) != Some(user.as_str()) {
                if edit
                    .safety_identifier
                    .as_deref()
                    .is_some_and(|s| !s.is_empty())
                {
                    edit.safety_identifier = Some(user.clone());
                }
                edit.user = Some(user.clone());
            }
        }
        // user limits: one request, n images
        let rate = self
            .rates
            .check_user(&who, edit.n_or_default())
            .await
            .map_err(|(e, rate)| (e.into(), Some(rate)))?;
        let this = self.clone();
        let rest = Box::pin(async move {
            // reserve quota: the upper bound of §7, settled to the usage
            let prices = this
                .models
                .prices(&edit.model)
                .ok_or(GatewayError::Internal)?;
            let bound = reservation_micros(&gpt::reservation_params(&edit), &prices);
            let reservation = this
                .reserve_quota(
                    &trail,
                    &who,
                    u32::from(edit.n_or_default()),
                    i64::try_from(bound).unwrap_or(i64::MAX),
                    Pricing::Tokens(prices),
                )
                .await?;
            // check files: by structure, on the blocking pool
            let checked = check_files(
                &this.decode_permits,
                &this.validated,
                &this.files,
                gpt::files_of(&edit),
            )
            .await;
            trail.update(|r| note_files(r, checked.first_image.as_ref(), checked.mask.as_ref()));
            let files = match checked.result {
                Ok(files) => files,
                Err(e) => {
                    reservation.refund().await;
                    return Err(e);
                }
            };
            gpt::replace_mask(&mut edit, files.mask);
            metrics::histogram!("imagegate_validation_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            // canonical body
            let mut canonical = gpt::canonical(&edit);
            canonical.body = canonical.body.holding(Arc::new(held));
            drop(edit);
            // forward → relay → settle and record
            let expect = Expect::GptImage {
                line_limit: this.models.max_event_bytes,
            };
            this.forwarder
                .forward(canonical, expect, reservation, trail)
                .await
        });
        Ok(Admitted { rate, rest })
    }

    /// The reserve-quota phase of both profiles: refused at once while the ledger's store is
    /// stalled (it neither answers nor fails), else reserved and written into the record.
    async fn reserve_quota(
        &self,
        trail: &Trail,
        who: &EndUser,
        images: u32,
        micros: i64,
        pricing: Pricing,
    ) -> Result<ReservationGuard, GatewayError> {
        if self.forwarder.ledger.stalled() {
            return Err(GatewayError::LedgerUnavailable);
        }
        let reservation = reserve(
            &self.quotas,
            &trail.request_id(),
            who,
            images,
            micros,
            pricing,
        )
        .await?;
        trail.update(|r| r.cost_reserved_micros = reservation.reserved_micros());
        Ok(reservation)
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
        .map_err(GatewayError::from)
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
