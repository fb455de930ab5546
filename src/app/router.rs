//! [`Router`]: path, then method; the health routes answered here.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response, StatusCode, header};
use tower::{Service, ServiceExt};

use crate::body::{Body, full};
use crate::error::GatewayError;
use crate::middleware::BoxFuture;

/// Ready to serve: an upstream key is configured and the ledger can be written.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Routes by path, then method: `POST /v1/images/edits` to the edits stack (overload layer
/// included), `GET`/`HEAD` `/healthz` and `/readyz` answered here; other paths 404 and other
/// methods 405, both in the JSON envelope. Generic over the edits service and the request body,
/// so it can be tested without a connection.
#[derive(Clone)]
pub struct Router<E> {
    pub(super) edits: E,
    pub(super) ready: Readiness,
}

impl<E> Router<E> {
    pub fn new(edits: E, ready: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Router {
            edits,
            ready: Arc::new(ready),
        }
    }
}

impl<E, B> Service<Request<B>> for Router<E>
where
    E: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    E::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Each route's readiness is awaited in its own call (a clone, `oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let path = req.uri().path();
        let method = req.method();
        let refuse =
            |e: GatewayError| -> Self::Future { Box::pin(async move { Ok(e.into_response()) }) };
        let not_allowed = |allowed: &'static str| GatewayError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
            allowed,
        };
        let health = method == Method::GET || method == Method::HEAD;
        match path {
            p if crate::middleware::usage::is_edits_route(p) => {
                if method == Method::POST {
                    let edits = self.edits.clone();
                    Box::pin(edits.oneshot(req))
                } else {
                    refuse(not_allowed("POST"))
                }
            }
            "/healthz" | "/readyz" if !health => refuse(not_allowed("GET, HEAD")),
            "/healthz" => Box::pin(async { Ok(json(StatusCode::OK, r#"{"status":"ok"}"#)) }),
            "/readyz" => {
                let ready = (self.ready)();
                Box::pin(async move {
                    Ok(if ready {
                        json(StatusCode::OK, r#"{"status":"ready"}"#)
                    } else {
                        json(
                            StatusCode::SERVICE_UNAVAILABLE,
                            r#"{"status":"not ready","reason":"no upstream key configured, or the ledger cannot be written"}"#,
                        )
                    })
                })
            }
            _ => refuse(GatewayError::UnknownUrl {
                method: method.to_string(),
                path: path.to_owned(),
            }),
        }
    }
}

pub(super) fn json(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::middleware::overload::OverloadLayer;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::ServiceBuilder;
    use tower::service_fn;
    use tower::util::BoxCloneSyncService;

    /// A router whose edits service answers 200 "edited".
    fn router(
        ready: Arc<AtomicBool>,
    ) -> Router<BoxCloneSyncService<Request<()>, Response<Body>, Infallible>> {
        let edits = service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(full("edited")))
        });
        Router::new(BoxCloneSyncService::new(edits), move || {
            ready.load(Ordering::SeqCst)
        })
    }

    fn request(method: Method, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
    }

    async fn call<S>(
        svc: &S,
        method: Method,
        path: &str,
    ) -> (StatusCode, http::HeaderMap, serde_json::Value)
    where
        S: Service<Request<()>, Response = Response<Body>, Error = Infallible> + Clone,
    {
        let resp = svc.clone().oneshot(request(method, path)).await.unwrap();
        let (head, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        (head.status, head.headers, json)
    }

    fn assert_envelope(json: &serde_json::Value, code: &str) {
        let e = &json["error"];
        assert_eq!(e["type"], "invalid_request_error", "{json}");
        assert_eq!(e["code"], code, "{json}");
        assert!(e["param"].is_null(), "{json}");
        assert!(e["message"].is_string(), "{json}");
    }

    #[tokio::test]
    async fn unknown_paths_are_404_in_the_envelope() {
        let r = router(Arc::new(AtomicBool::new(true)));
        for path in ["/", "/v1/images/generations", "/metrics", "/healthz/x"] {
            let (status, headers, json) = call(&r, Method::GET, path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(headers[header::CONTENT_TYPE], "application/json");
            assert_envelope(&json, "unknown_url");
            assert_eq!(
                json["error"]["message"],
                format!("Invalid URL (GET {path})")
            );
        }
    }

    #[tokio::test]
    async fn wrong_methods_are_405_with_allow() {
        let r = router(Arc::new(AtomicBool::new(true)));
        for (method, path, allow) in [
            (Method::GET, "/v1/images/edits", "POST"),
            (Method::PUT, "/v1/images/edits/", "POST"),
            (Method::POST, "/healthz", "GET, HEAD"),
            (Method::DELETE, "/readyz", "GET, HEAD"),
        ] {
            let (status, headers, json) = call(&r, method.clone(), path).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(headers[header::ALLOW], allow);
            assert_envelope(&json, "method_not_allowed");
        }
    }

    #[tokio::test]
    async fn health_routes_and_the_edits_route() {
        let ready = Arc::new(AtomicBool::new(true));
        let r = router(ready.clone());
        for method in [Method::GET, Method::HEAD] {
            let (status, _, json) = call(&r, method, "/healthz").await;
            assert_eq!((status, &json["status"]), (StatusCode::OK, &"ok".into()));
        }
        let (status, _, json) = call(&r, Method::GET, "/readyz").await;
        assert_eq!((status, &json["status"]), (StatusCode::OK, &"ready".into()));
        ready.store(false, Ordering::SeqCst);
        let (status, _, json) = call(&r, Method::GET, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json["status"], "not ready");
        let (status, _, _) = call(&r, Method::GET, "/healthz").await;
        assert_eq!(status, StatusCode::OK, "alive even when not ready");
        for path in ["/v1/images/edits", "/v1/images/edits/"] {
            let (status, _, body) = call(&r, Method::POST, path).await;
            assert_eq!((status, body), (StatusCode::OK, "edited".into()), "{path}");
        }
    }

    /// The order `build` uses: router above the overload layer, which wraps only the edits
    /// service. With every in-flight permit taken by an edit that does not finish, the next edit
    /// is shed and the health routes still answer.
    #[tokio::test]
    async fn health_answers_while_edits_are_shed() {
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
        let held = Arc::new(tokio::sync::Notify::new());
        let hanging = {
            let held = held.clone();
            service_fn(move |_req: Request<()>| {
                let (entered_tx, held) = (entered_tx.clone(), held.clone());
                async move {
                    // Registered before saying "entered", so the release cannot be missed.
                    let released = held.notified();
                    let _ = entered_tx.send(());
                    released.await;
                    Ok::<_, Infallible>(Response::new(full("edited")))
                }
            })
        };
        let edits = ServiceBuilder::new()
            .layer(OverloadLayer::new(2))
            .service(hanging);
        let r = Router::new(BoxCloneSyncService::new(edits), || true);
        let in_flight: Vec<_> = (0..2)
            .map(|_| tokio::spawn(r.clone().oneshot(request(Method::POST, "/v1/images/edits"))))
            .collect();
        for _ in 0..2 {
            entered.recv().await.unwrap();
        }
        let (status, _, json) = call(&r, Method::POST, "/v1/images/edits").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json["error"]["code"], "overloaded");
        for path in ["/healthz", "/readyz"] {
            let (status, _, _) = call(&r, Method::GET, path).await;
            assert_eq!(status, StatusCode::OK, "{path} under load");
        }
        let (status, _, _) = call(&r, Method::GET, "/nope").await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "routing answers are not shed either"
        );
        held.notify_waiters();
        for t in in_flight {
            assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
        }
    }
}
