//! One layer per file. Each module doc says what the layer does, what it rejects with which
//! status, and what request data it reads and writes. The stack itself is built in `app.rs`.

pub mod auth;
pub mod client_limit;
pub mod overload;
pub mod request_id;
pub mod usage;

use std::future::Future;
use std::pin::Pin;

/// The future type of the gateway's services: boxed, `Send`, never failing (errors are responses).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Take the inner service that `poll_ready` drove to readiness, leaving a fresh clone behind
/// (tower's rule: the clone that was made ready is the one to call).
pub fn take_ready<S: Clone>(inner: &mut S) -> S {
    let fresh = inner.clone();
    std::mem::replace(inner, fresh)
}
