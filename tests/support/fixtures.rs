//! Image fixtures for the integration tests and benches: the library's test kit
//! (`imagegate::testkit`, enabled by the `testkit` feature that `[dev-dependencies]` turns on).

pub use imagegate::testkit::*;
