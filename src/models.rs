//! The models a gateway accepts, each with its rule profile, its lifecycle and its prices: the
//! `[models]` section, whose types live in `config::models` (configuration is plain data) and are
//! re-exported here under their old paths.

pub use crate::config::models::*;
