//! The hold rows of open reservations and how start-up recovery reconciles them with the
//! ledger.

/// What start-up recovery did with the holds a crash left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldRecovery {
    /// Holds of requests that have no record (never forwarded): refunded.
    pub refunded: u64,
    /// Holds whose record is final: set to what the record charges.
    pub reconciled: u64,
    /// Micro-dollars the corrections added (negative: removed) in all.
    pub micros_delta: i64,
    /// Holds left alone (their record is still `forwarding`).
    pub left: u64,
}

impl HoldRecovery {
    pub fn is_empty(&self) -> bool {
        self.refunded == 0 && self.reconciled == 0 && self.left == 0
    }
}

/// One hold row with its record, if any: `(outcome, cost_settled_micros, images_returned)`.
pub(super) struct Hold {
    pub(super) request_id: String,
    pub(super) scopes: Vec<String>,
    pub(super) day: String,
    pub(super) month: String,
    pub(super) reserved_images: i64,
    pub(super) reserved_micros: i64,
    pub(super) images: i64,
    pub(super) micros: i64,
    pub(super) settled: bool,
    pub(super) record: Option<(String, i64, Option<i64>)>,
}

impl Hold {
    /// What to add to the quota so this request counts what its record charges; `None`: leave
    /// the hold (its record is still `forwarding`).
    pub(super) fn correction(&self, report: &mut HoldRecovery) -> Option<(i64, i64)> {
        let (images, micros) = match &self.record {
            None => {
                report.refunded += 1;
                (0, 0)
            }
            Some((outcome, _, _)) if outcome == "forwarding" => {
                report.left += 1;
                return None;
            }
            Some((outcome, charged, returned)) => {
                report.reconciled += 1;
                let images = if outcome == "unknown" {
                    self.reserved_images
                } else if self.settled && self.micros == *charged {
                    self.images
                } else if *charged == 0 {
                    0
                } else if *charged >= self.reserved_micros {
                    self.reserved_images
                } else {
                    returned.unwrap_or(0).clamp(0, self.reserved_images)
                };
                (images, *charged)
            }
        };
        report.micros_delta += micros - self.micros;
        Some((images - self.images, micros - self.micros))
    }
}

pub(super) fn scopes_json<S: serde::Serialize>(scopes: &[S]) -> String {
    serde_json::to_string(scopes).unwrap_or_else(|_| "[]".into())
}

pub(super) fn parse_scopes(json: String) -> Vec<String> {
    serde_json::from_str(&json).unwrap_or_default()
}
