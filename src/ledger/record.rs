//! The ledger record, its outcome, the prompt policy, and the chain entry format.
//!
//! A [`Record`] is the whole state of one request; every write carries the whole record (a
//! `Complete` replaces what the `Begin` said). Serialized with serde it is also the JSONL export
//! line and the `record` of a chain entry: `received_at` is RFC 3339 (UTC, `Z`), money is
//! integer micro-dollars, every field is always present (`null` when unknown) so the JSON of a
//! record is canonical: field order is declaration order, and serde_json escapes strings
//! deterministically.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::Digest;

pub use crate::config::PromptPolicy;

impl PromptPolicy {
    /// The prompt as the ledger stores it under this policy.
    pub fn apply(self, prompt: &str) -> Option<String> {
        match self {
            PromptPolicy::None => Option::None,
            PromptPolicy::Sha256 => Some(format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(prompt.as_bytes()))
            )),
            PromptPolicy::Full => Some(prompt.to_owned()),
        }
    }
}

impl FromStr for PromptPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(PromptPolicy::None),
            "sha256" => Ok(PromptPolicy::Sha256),
            "full" => Ok(PromptPolicy::Full),
            other => Err(format!(
                "unknown prompt policy {other:?} (none, sha256, full)"
            )),
        }
    }
}

/// How a request ended (or that it has not yet).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Committed before forwarding; the answer is not known yet. Never a final state.
    Forwarding,
    /// The upstream answered (any status) and the answer was delivered.
    Answered,
    /// The gateway refused the request (authentication, validation, rate limit, quota, ...);
    /// `reason_code` / `reason_param` say why.
    Rejected,
    /// The upstream could not be reached or failed mid-answer.
    UpstreamError,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The client went away (mid-upload or mid-answer).
    ClientGone,
    /// The gateway stopped while the request was forwarding (set by recovery): whether the
    /// upstream answered, and charged, is not known.
    #[default]
    Unknown,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Forwarding,
        Outcome::Answered,
        Outcome::Rejected,
        Outcome::UpstreamError,
        Outcome::UpstreamTimeout,
        Outcome::ClientGone,
        Outcome::Unknown,
    ];

    /// The stored and serialized name (`snake_case`).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarding => "forwarding",
            Outcome::Answered => "answered",
            Outcome::Rejected => "rejected",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::ClientGone => "client_gone",
            Outcome::Unknown => "unknown",
        }
    }

    /// Every outcome but `Forwarding` ends a request.
    pub fn is_final(self) -> bool {
        self != Outcome::Forwarding
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| format!("unknown outcome {s:?}"))
    }
}

/// What a record's settled cost was computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CostBasis {
    /// A per-image price list (the dall-e-2 profile).
    PerImage,
    /// The token `usage` of the answer, at the model's token prices.
    Usage,
    /// The answer had no usage: the reservation was charged.
    Estimated,
}

impl CostBasis {
    pub const ALL: [CostBasis; 3] = [CostBasis::PerImage, CostBasis::Usage, CostBasis::Estimated];

    /// The stored and serialized name (`snake_case`).
    pub fn as_str(self) -> &'static str {
        match self {
            CostBasis::PerImage => "per_image",
            CostBasis::Usage => "usage",
            CostBasis::Estimated => "estimated",
        }
    }
}

impl fmt::Display for CostBasis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CostBasis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        CostBasis::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| format!("unknown cost basis {s:?}"))
    }
}

/// One request to the edits route. See the module doc for the serialized form.
///
/// Fields added after the first release (`quality` to `cost_basis`, then `upstream_key`) are
/// `null` in chain entries written before them: `#[serde(default)]` reads those entries
/// unchanged.
///
/// `forwarded` is maintained by the store, not the caller: it is `true` exactly when a `Begin`
/// was committed for the request (whatever the caller put there is overwritten).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    /// The gateway's request id (`req_` + 32 hex); the records table's key.
    pub request_id: String,
    /// When the gateway received the request. Stored with microsecond precision (finer parts
    /// are truncated on write).
    #[serde(with = "rfc3339")]
    pub received_at: Timestamp,
    /// Gateway client name, when authenticated.
    pub client: Option<String>,
    /// End user (the form's `user`, normalized), when known.
    pub user: Option<String>,
    /// Peer address of the connection.
    pub client_addr: Option<String>,
    pub outcome: Outcome,
    /// For rejections (and gateway-made errors): the OpenAI-style `code`, `param` and message.
    pub reason_code: Option<String>,
    pub reason_param: Option<String>,
    pub reason_message: Option<String>,
    /// HTTP status the gateway answered with.
    pub status: Option<u16>,
    /// HTTP status the upstream answered with, and its `x-request-id`.
    pub upstream_status: Option<u16>,
    pub upstream_request_id: Option<String>,
    pub model: Option<String>,
    pub n: Option<u8>,
    pub size: Option<String>,
    pub response_format: Option<String>,
    pub images_returned: Option<u32>,
    /// USD micro-dollars held against the quotas before forwarding, and finally charged.
    pub cost_reserved_micros: i64,
    pub cost_settled_micros: i64,
    pub image_sha256: Option<String>,
    pub image_bytes: Option<u64>,
    pub image_width: Option<u32>,
    pub image_height: Option<u32>,
    pub mask_sha256: Option<String>,
    pub mask_bytes: Option<u64>,
    pub mask_width: Option<u32>,
    pub mask_height: Option<u32>,
    /// The prompt, already reduced by [`PromptPolicy::apply`].
    pub prompt: Option<String>,
    /// Whole request, and the upstream exchange alone, in milliseconds.
    pub total_ms: Option<u64>,
    pub upstream_ms: Option<u64>,
    /// The request's `quality` and `output_format` (as resolved by the upstream when its answer
    /// says, else as requested).
    pub quality: Option<String>,
    pub output_format: Option<String>,
    /// How many input images the request carried (the mask not included).
    pub input_images: Option<u32>,
    /// Whether the request asked for a streamed answer (`stream=true`).
    pub stream: Option<bool>,
    /// The answer's token `usage`: `input_tokens`, its `input_tokens_details.text_tokens` and
    /// `.image_tokens`, `output_tokens`, `total_tokens`.
    pub input_tokens: Option<u64>,
    pub input_text_tokens: Option<u64>,
    pub input_image_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    /// The keys of the answer's `usage` that have no field above (e.g.
    /// `input_tokens_details.cached_tokens_details`), as a JSON object in text.
    pub usage_extra: Option<String>,
    /// What `cost_settled_micros` was computed from.
    pub cost_basis: Option<CostBasis>,
    /// The name of the upstream key the request was sent with (`[[upstream.keys]]`, or
    /// `default`); for a request sent to a second key after a refusal, the second.
    pub upstream_key: Option<String>,
    /// Set by the store: a `Begin` was committed for this request.
    pub forwarded: bool,
}

/// Longest request id accepted (the gateway's own are 36 bytes).
pub const MAX_REQUEST_ID_LEN: usize = 200;

impl Record {
    /// A record with its id and time of arrival; everything else unknown.
    pub fn new(request_id: impl Into<String>, received_at: Timestamp) -> Record {
        Record {
            request_id: request_id.into(),
            received_at,
            ..Record::default()
        }
    }

    /// Check what the stores cannot represent. Errors name the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.request_id.is_empty() {
            return Err("request_id is empty".into());
        }
        if self.request_id.len() > MAX_REQUEST_ID_LEN {
            return Err(format!(
                "request_id is longer than {MAX_REQUEST_ID_LEN} bytes"
            ));
        }
        let big = [
            ("image_bytes", self.image_bytes),
            ("mask_bytes", self.mask_bytes),
            ("total_ms", self.total_ms),
            ("upstream_ms", self.upstream_ms),
            ("input_tokens", self.input_tokens),
            ("input_text_tokens", self.input_text_tokens),
            ("input_image_tokens", self.input_image_tokens),
            ("output_tokens", self.output_tokens),
            ("total_tokens", self.total_tokens),
        ];
        for (name, v) in big {
            if v.is_some_and(|v| i64::try_from(v).is_err()) {
                return Err(format!("{name} does not fit a signed 64-bit integer"));
            }
        }
        Ok(())
    }

    /// The record as stores keep it: `received_at` truncated to whole microseconds.
    pub fn normalized(mut self) -> Record {
        self.received_at = truncate_to_micros(self.received_at);
        self
    }
}

/// `ts` without its sub-microsecond part.
pub fn truncate_to_micros(ts: Timestamp) -> Timestamp {
    // A Timestamp's range (years -9999..=9999) always fits in i64 microseconds, and any i64
    // taken from a Timestamp converts back.
    Timestamp::from_microsecond(ts.as_microsecond()).unwrap_or(ts)
}

/// RFC 3339 (de)serialization of a [`Timestamp`] (jiff's `serde` feature is not enabled in
/// the main crate, so this stays independent of it).
pub mod rfc3339 {
    use jiff::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(ts: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(ts)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<Timestamp>()
            .map_err(|e| D::Error::custom(format!("received_at {s:?}: {e}")))
    }
}

/// What a chain entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Begin,
    Complete,
    Final,
    Recover,
}

/// Version of the chain entry format.
pub const ENTRY_VERSION: u32 = 1;

/// `prev_hash` of the first chain entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A chain entry as written (borrows the record).
#[derive(Serialize)]
pub(crate) struct EntryOut<'a> {
    pub v: u32,
    pub kind: EntryKind,
    pub record: &'a Record,
}

/// A chain entry as read back.
#[derive(Deserialize)]
pub(crate) struct EntryIn {
    pub v: u32,
    pub kind: EntryKind,
    pub record: Record,
}

/// The canonical JSON of a chain entry.
pub(crate) fn entry_json(kind: EntryKind, record: &Record) -> Result<String, serde_json::Error> {
    serde_json::to_string(&EntryOut {
        v: ENTRY_VERSION,
        kind,
        record,
    })
}

/// `hex(sha256(prev_hash || entry_json))`, both taken as their UTF-8 bytes.
pub fn chain_hash(prev_hash: &str, entry_json: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(entry_json.as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::sample;

    #[test]
    fn prompt_policies() {
        assert_eq!(PromptPolicy::None.apply("a cat"), None);
        assert_eq!(
            PromptPolicy::Sha256.apply("abc").unwrap(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(PromptPolicy::Full.apply("a cat").unwrap(), "a cat");
        assert_eq!(PromptPolicy::default(), PromptPolicy::Sha256);
        let p: PromptPolicy = serde_json::from_str("\"full\"").unwrap();
        assert_eq!(p, PromptPolicy::Full);
        assert_eq!("none".parse::<PromptPolicy>().unwrap(), PromptPolicy::None);
        assert!("NONE".parse::<PromptPolicy>().is_err());
    }

    #[test]
    fn outcome_names_round_trip() {
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>().unwrap(), o);
            assert_eq!(serde_json::to_string(&o).unwrap(), format!("\"{o}\""));
        }
        assert!(!Outcome::Forwarding.is_final());
        assert!(Outcome::ClientGone.is_final());
        assert!("Answered".parse::<Outcome>().is_err());
    }

    #[test]
    fn record_json_is_canonical_and_round_trips() {
        let r = sample();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.starts_with(
            r#"{"request_id":"req_0123456789abcdef0123456789abcdef","received_at":"2025-03-04T05:06:07.123456Z","#
        ));
        // Every field present, nulls included: the JSON of equal records is equal.
        assert!(json.contains(r#""mask_sha256":null"#));
        let back: Record = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        // A bad timestamp is an error, not a default.
        let bad = json.replace("2025-03-04T05:06:07.123456Z", "yesterday");
        assert!(serde_json::from_str::<Record>(&bad).is_err());
    }

    #[test]
    fn cost_basis_names_round_trip() {
        for b in CostBasis::ALL {
            assert_eq!(b.as_str().parse::<CostBasis>().unwrap(), b);
            assert_eq!(serde_json::to_string(&b).unwrap(), format!("\"{b}\""));
        }
        assert_eq!(CostBasis::PerImage.as_str(), "per_image");
        assert!("PerImage".parse::<CostBasis>().is_err());
    }

    #[test]
    fn new_fields_sit_between_upstream_ms_and_forwarded() {
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(
            json.contains(
                r#""upstream_ms":12000,"quality":"high","output_format":"png","input_images":2,"stream":false,"input_tokens":1060,"input_text_tokens":60,"input_image_tokens":1000,"output_tokens":2000,"total_tokens":3060,"usage_extra":"{\"input_tokens_details\":{\"cached_tokens_details\":{\"text_tokens\":0}}}","cost_basis":"usage","upstream_key":null,"forwarded":false}"#
            ),
            "{json}"
        );
        let empty = serde_json::to_string(&Record::default()).unwrap();
        assert!(empty.contains(
            r#""usage_extra":null,"cost_basis":null,"upstream_key":null,"forwarded":false"#
        ));
    }

    #[test]
    fn a_first_release_entry_still_reads() {
        // A chain entry as the first release wrote it: no quality .. cost_basis keys.
        let old = r#"{"v":1,"kind":"complete","record":{"request_id":"req_old","received_at":"2025-01-01T00:00:00Z","client":"acme","user":null,"client_addr":null,"outcome":"answered","reason_code":null,"reason_param":null,"reason_message":null,"status":200,"upstream_status":200,"upstream_request_id":null,"model":"dall-e-2","n":1,"size":"1024x1024","response_format":"b64_json","images_returned":1,"cost_reserved_micros":20000,"cost_settled_micros":20000,"image_sha256":null,"image_bytes":null,"image_width":null,"image_height":null,"mask_sha256":null,"mask_bytes":null,"mask_width":null,"mask_height":null,"prompt":null,"total_ms":5,"upstream_ms":4,"forwarded":true}}"#;
        let e: EntryIn = serde_json::from_str(old).unwrap();
        assert_eq!(e.kind, EntryKind::Complete);
        let r = e.record;
        assert_eq!(r.model.as_deref(), Some("dall-e-2"));
        assert_eq!((r.cost_settled_micros, r.forwarded), (20_000, true));
        assert_eq!(
            (r.quality, r.input_tokens, r.usage_extra, r.cost_basis),
            (None, None, None, None)
        );
        // An unknown cost basis is an error, not a default.
        let bad = serde_json::to_string(&sample())
            .unwrap()
            .replace(r#""cost_basis":"usage""#, r#""cost_basis":"free""#);
        assert!(serde_json::from_str::<Record>(&bad).is_err());
    }

    #[test]
    fn validation_and_normalization() {
        assert!(sample().validate().is_ok());
        assert!(
            Record::default()
                .validate()
                .unwrap_err()
                .contains("request_id")
        );
        let long = Record::new("x".repeat(MAX_REQUEST_ID_LEN + 1), Timestamp::UNIX_EPOCH);
        assert!(long.validate().is_err());
        let mut big = sample();
        big.image_bytes = Some(u64::MAX);
        assert!(big.validate().unwrap_err().contains("image_bytes"));
        let mut big = sample();
        big.output_tokens = Some(u64::MAX);
        assert!(big.validate().unwrap_err().contains("output_tokens"));

        let fine: Timestamp = "2025-03-04T05:06:07.123456789Z".parse().unwrap();
        let r = Record::new("a", fine).normalized();
        assert_eq!(r.received_at.to_string(), "2025-03-04T05:06:07.123456Z");
        let before: Timestamp = "1969-12-31T23:59:59.5Z".parse().unwrap();
        assert_eq!(truncate_to_micros(before), before);
    }

    #[test]
    fn chain_hash_is_sha256_of_prev_then_entry() {
        let h = chain_hash(GENESIS_HASH, "{}");
        let mut manual = sha2::Sha256::new();
        manual.update(format!("{GENESIS_HASH}{{}}").as_bytes());
        assert_eq!(h, hex::encode(manual.finalize()));
        assert_eq!(h.len(), 64);
        let e = entry_json(EntryKind::Begin, &sample()).unwrap();
        assert!(e.starts_with(r#"{"v":1,"kind":"begin","record":{"request_id":"#));
    }
}
