//! imagegate: a validating, re-keying gateway for OpenAI's image-edit API.
//!
//! The binary (`src/main.rs`) and the integration tests share this library.

/// A boxed, sendable future: the response future of the layers and phases.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

pub mod admin;
pub mod answer;
pub mod app;
pub mod body;
pub mod cli;
pub mod clock;
pub mod config;
pub mod edit;
pub mod edits;
pub mod error;
pub mod extensions;
pub mod keypool;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod middleware;
pub mod models;
pub mod models_check;
pub mod pricing;
pub mod record;
pub mod reload;
pub mod server;
pub mod startup;
pub mod telemetry;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod tls;
pub mod upstream;
