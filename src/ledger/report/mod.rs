//! Usage reports and record exports.
//!
//! - `UsageAggregator` folds records into [`UsageRow`]s; every store feeds it, so grouping
//!   (including calendar days in any time zone) behaves the same whatever the backend.
//! - [`render_usage`]: a table for people (USD with 6 decimals), CSV (one `rejected:<code>`
//!   column per reason seen) or JSON (an array of rows, `spend_micros` and `spend_usd`). Every
//!   form has the summed input and output tokens.
//! - [`write_export`]: the records themselves, as JSON Lines (one [`Record`] per line, the same
//!   JSON as the chain entries) or CSV (header = the JSON field names, RFC 4180 quoting, empty
//!   cell for a missing value, `received_at` in RFC 3339). In every CSV form, a text cell that
//!   begins with `=`, `+`, `-`, `@`, a tab or CR (a prompt or user name a spreadsheet would run
//!   as a formula) is neutralized with a leading `'`; numbers (a negative amount) stay numbers.

//!
//! Files: here the reports; `export` the record exports.

mod export;

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Serialize;

use super::record::Outcome;
use super::store::{GroupBy, UsageFact, UsageQuery, UsageRow};

pub use export::{CSV_COLUMNS, write_export};

/// Output of [`render_usage`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Table,
    Csv,
    Json,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(format!("unknown format {other:?} (table, csv, json)")),
        }
    }
}

/// Output of [`write_export`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExportFormat {
    #[default]
    Jsonl,
    Csv,
}

impl FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "jsonl" => Ok(ExportFormat::Jsonl),
            "csv" => Ok(ExportFormat::Csv),
            other => Err(format!("unknown export format {other:?} (jsonl, csv)")),
        }
    }
}

/// `1234567` → `"1.234567"`, `-5` → `"-0.000005"`.
pub fn micros_to_usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

/// Parse a report bound (`since`, `until`): an RFC 3339 timestamp (`2025-01-02T03:04:05Z`,
/// `...+02:00`) or a plain date `YYYY-MM-DD`, meaning midnight at its start in `tz`.
pub fn parse_time_bound(s: &str, tz: &TimeZone) -> Result<Timestamp, String> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    let bad = || format!("{s:?} is neither an RFC 3339 timestamp nor a YYYY-MM-DD date");
    // A datetime without an offset also parses as a date; refuse it rather than drop its time.
    if s.len() != 10 {
        return Err(bad());
    }
    let date: jiff::civil::Date = s.parse().map_err(|_| bad())?;
    date.to_zoned_datetime(tz.clone())
        .map(|z| z.timestamp())
        .map_err(|e| format!("{s:?}: {e}"))
}

/// The filters shared by `imagegate usage`, `imagegate audit export` and `GET /admin/usage`,
/// as given (time bounds still text): each front end fills them in its own way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageFilters {
    /// Only requests received at or after this time (RFC 3339, or YYYY-MM-DD in the time zone).
    pub since: Option<String>,
    /// Only requests received before this time.
    pub until: Option<String>,
    /// Only this client.
    pub client: Option<String>,
    /// Only this end user.
    pub user: Option<String>,
}

impl UsageFilters {
    /// The ledger query for these filters, with times read in `time_zone`. Errors name the
    /// filter as its command-line flag (`--since: ...`).
    pub fn query(&self, group_by: Option<&str>, time_zone: &str) -> Result<UsageQuery, String> {
        let tz = TimeZone::get(time_zone).map_err(|e| format!("time zone '{time_zone}': {e}"))?;
        let bound = |v: &Option<String>, name: &str| {
            v.as_deref()
                .map(|s| parse_time_bound(s, &tz).map_err(|e| format!("--{name}: {e}")))
                .transpose()
        };
        Ok(UsageQuery {
            since: bound(&self.since, "since")?,
            until: bound(&self.until, "until")?,
            client: self.client.clone(),
            user: self.user.clone(),
            group_by: group_by.map(str::parse).transpose()?.unwrap_or_default(),
            time_zone: Some(tz),
            limit: None,
        })
    }
}

/// Key of records with no client or no user.
const MISSING: &str = "-";
/// Key of the single row of `GroupBy::None`.
const TOTAL: &str = "total";
/// Rejection reason of a rejected record without a code.
const UNSPECIFIED: &str = "unspecified";

/// Folds [`UsageFact`]s into rows keyed by the query's grouping.
pub(crate) struct UsageAggregator {
    group_by: GroupBy,
    tz: TimeZone,
    rows: BTreeMap<String, UsageRow>,
}

impl UsageAggregator {
    pub(crate) fn new(q: &UsageQuery) -> UsageAggregator {
        UsageAggregator {
            group_by: q.group_by,
            tz: q.time_zone.clone().unwrap_or(TimeZone::UTC),
            rows: BTreeMap::new(),
        }
    }

    fn key(&self, f: &UsageFact<'_>) -> String {
        match self.group_by {
            GroupBy::None => TOTAL.to_owned(),
            GroupBy::Client => f.client.unwrap_or(MISSING).to_owned(),
            GroupBy::User => format!(
                "{}/{}",
                f.client.unwrap_or(MISSING),
                f.user.unwrap_or(MISSING)
            ),
            GroupBy::Model => f.model.unwrap_or(MISSING).to_owned(),
            GroupBy::Day => match Timestamp::from_microsecond(f.received_at_us) {
                Ok(t) => self.tz.to_datetime(t).date().to_string(),
                Err(_) => "invalid-date".to_owned(),
            },
        }
    }

    pub(crate) fn add(&mut self, f: UsageFact<'_>) {
        let key = self.key(&f);
        let row = self.rows.entry(key).or_insert_with_key(|k| UsageRow {
            key: k.clone(),
            ..UsageRow::default()
        });
        row.requests += 1;
        row.forwarded += u64::from(f.forwarded);
        row.images += u64::from(f.images);
        row.spend_micros = row.spend_micros.saturating_add(f.spend_micros);
        row.input_tokens = row.input_tokens.saturating_add(f.input_tokens);
        row.output_tokens = row.output_tokens.saturating_add(f.output_tokens);
        if f.outcome == Outcome::Rejected {
            let reason = f.reason_code.unwrap_or(UNSPECIFIED);
            // Look up before allocating: most rejections repeat a known reason.
            match row.rejections.get_mut(reason) {
                Some(n) => *n += 1,
                None => {
                    row.rejections.insert(reason.to_owned(), 1);
                }
            }
        }
    }

    /// Rows sorted by key; `GroupBy::None` always yields its one row.
    pub(crate) fn finish(mut self) -> Vec<UsageRow> {
        if self.group_by == GroupBy::None && self.rows.is_empty() {
            self.rows.insert(
                TOTAL.to_owned(),
                UsageRow {
                    key: TOTAL.to_owned(),
                    ..UsageRow::default()
                },
            );
        }
        self.rows.into_values().collect()
    }
}

fn rejections_text(row: &UsageRow) -> String {
    if row.rejections.is_empty() {
        return MISSING.to_owned();
    }
    row.rejections
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Render usage rows for people (`Table`) or programs (`Csv`, `Json`).
pub fn render_usage(rows: &[UsageRow], format: Format) -> String {
    match format {
        Format::Table => render_table(rows),
        Format::Csv => render_csv(rows),
        Format::Json => {
            #[derive(Serialize)]
            struct Out<'a> {
                #[serde(flatten)]
                row: &'a UsageRow,
                spend_usd: String,
            }
            let out: Vec<Out<'_>> = rows
                .iter()
                .map(|row| Out {
                    row,
                    spend_usd: micros_to_usd(row.spend_micros),
                })
                .collect();
            let mut s = serde_json::to_string_pretty(&out).unwrap_or_else(|_| "[]".to_owned());
            s.push('\n');
            s
        }
    }
}

fn render_table(rows: &[UsageRow]) -> String {
    let header = [
        "KEY",
        "REQUESTS",
        "FORWARDED",
        "IMAGES",
        "SPEND (USD)",
        "IN TOKENS",
        "OUT TOKENS",
        "REJECTED",
        "REJECTIONS BY REASON",
    ];
    let line = |r: &UsageRow| {
        [
            r.key.clone(),
            r.requests.to_string(),
            r.forwarded.to_string(),
            r.images.to_string(),
            micros_to_usd(r.spend_micros),
            r.input_tokens.to_string(),
            r.output_tokens.to_string(),
            r.rejected().to_string(),
            rejections_text(r),
        ]
    };
    let mut lines: Vec<[String; 9]> = vec![header.map(str::to_owned)];
    lines.extend(rows.iter().map(line));
    if rows.len() > 1 {
        let mut total = UsageRow {
            key: "TOTAL".into(),
            ..UsageRow::default()
        };
        for r in rows {
            total.requests += r.requests;
            total.forwarded += r.forwarded;
            total.images += r.images;
            total.spend_micros = total.spend_micros.saturating_add(r.spend_micros);
            total.input_tokens = total.input_tokens.saturating_add(r.input_tokens);
            total.output_tokens = total.output_tokens.saturating_add(r.output_tokens);
            for (k, v) in &r.rejections {
                *total.rejections.entry(k.clone()).or_default() += v;
            }
        }
        lines.push(line(&total));
    }
    let mut widths = [0usize; 9];
    for l in &lines {
        for (w, cell) in widths.iter_mut().zip(l) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for l in &lines {
        let mut text = String::new();
        for (i, cell) in l.iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            // Key and reasons left-aligned, numbers right-aligned.
            if i == 0 || i == 8 {
                text.push_str(&format!("{cell:<w$}", w = widths[i]));
            } else {
                text.push_str(&format!("{cell:>w$}", w = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

fn render_csv(rows: &[UsageRow]) -> String {
    let reasons: BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.rejections.keys().map(String::as_str))
        .collect();
    let mut header: Vec<String> = [
        "key",
        "requests",
        "forwarded",
        "images",
        "spend_usd",
        "spend_micros",
        "input_tokens",
        "output_tokens",
        "rejected",
    ]
    .map(str::to_owned)
    .to_vec();
    header.extend(reasons.iter().map(|r| format!("rejected:{r}")));
    let mut out = String::new();
    push_csv_line(&mut out, header.iter().map(String::as_str));
    for r in rows {
        let mut cells = vec![
            r.key.clone(),
            r.requests.to_string(),
            r.forwarded.to_string(),
            r.images.to_string(),
            micros_to_usd(r.spend_micros),
            r.spend_micros.to_string(),
            r.input_tokens.to_string(),
            r.output_tokens.to_string(),
            r.rejected().to_string(),
        ];
        cells.extend(
            reasons
                .iter()
                .map(|k| r.rejections.get(*k).copied().unwrap_or(0).to_string()),
        );
        push_csv_line(&mut out, cells.iter().map(String::as_str));
    }
    out
}

/// Append one CSV line (RFC 4180: quote cells holding `,`, `"`, CR or LF; CRLF-free `\n` ends),
/// each cell [neutralized](neutralize) for spreadsheets.
pub(super) fn push_csv_line<'a>(out: &mut String, cells: impl Iterator<Item = &'a str>) {
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let cell = neutralize(cell);
        let cell = cell.as_ref();
        if cell.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&cell.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(cell);
        }
    }
    out.push('\n');
}

/// A cell a spreadsheet would read as a formula (it begins with `=`, `+`, `-`, `@`, a tab or
/// CR) gets a leading `'`, so it is shown as text; a cell that is a number (`-3`, `-0.000003`)
/// is left as it is.
pub(super) fn neutralize(cell: &str) -> std::borrow::Cow<'_, str> {
    let risky = cell.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let number = cell.parse::<i64>().is_ok()
        || (cell.parse::<f64>().is_ok_and(f64::is_finite)
            && cell
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'-' || b == b'.'));
    if risky && !number {
        std::borrow::Cow::Owned(format!("'{cell}"))
    } else {
        std::borrow::Cow::Borrowed(cell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Record;
    use crate::ledger::record::CostBasis;
    use crate::ledger::sqlite::SqliteStore;
    use crate::ledger::store::LedgerOp;
    use crate::ledger::store::LedgerStore;
    use crate::ledger::test_support::rec;

    /// A tiny RFC 4180 reader for the round trip (quoted cells may hold `,`, `"` and newlines).
    pub(super) fn parse_csv(text: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let mut row = Vec::new();
        let mut cell = String::new();
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    cell.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => cell.push(c),
                (false, '"') => quoted = true,
                (false, ',') => row.push(std::mem::take(&mut cell)),
                (false, '\n') => {
                    row.push(std::mem::take(&mut cell));
                    rows.push(std::mem::take(&mut row));
                }
                (false, c) => cell.push(c),
            }
        }
        rows
    }

    fn usage_store() -> SqliteStore {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let answered = |id: &str, at: &str, client: &str, user: Option<&str>, images, usd| Record {
            images_returned: Some(images),
            cost_reserved_micros: usd,
            cost_settled_micros: usd,
            ..rec(id, at, client, user, Outcome::Answered)
        };
        let rejected =
            |id: &str, at: &str, client: &str, user: Option<&str>, code: Option<&str>| Record {
                reason_code: code.map(Into::into),
                ..rec(id, at, client, user, Outcome::Rejected)
            };
        let mut ops = Vec::new();
        for r in [
            answered(
                "a1",
                "2025-01-01T10:00:00Z",
                "acme",
                Some("alice"),
                2,
                80_000,
            ),
            answered(
                "a2",
                "2025-01-01T23:30:00Z",
                "acme",
                Some("alice"),
                1,
                40_000,
            ),
            answered("a3", "2025-01-02T01:00:00Z", "acme", Some("bob"), 1, 40_000),
            answered(
                "b1",
                "2025-01-02T12:00:00Z",
                "beta",
                Some("alice"),
                4,
                160_000,
            ),
        ] {
            ops.push(LedgerOp::Begin(r.clone()));
            ops.push(LedgerOp::Complete(r));
        }
        for r in [
            rejected(
                "r1",
                "2025-01-01T11:00:00Z",
                "acme",
                Some("alice"),
                Some("rate_limit_exceeded"),
            ),
            rejected(
                "r2",
                "2025-01-01T12:00:00Z",
                "acme",
                Some("alice"),
                Some("rate_limit_exceeded"),
            ),
            rejected(
                "r3",
                "2025-01-02T02:00:00Z",
                "acme",
                Some("bob"),
                Some("invalid_image"),
            ),
            rejected("r4", "2025-01-02T03:00:00Z", "beta", None, None),
        ] {
            ops.push(LedgerOp::Final(r));
        }
        // Unauthenticated: no client at all.
        let mut anon = rejected(
            "r5",
            "2025-01-03T00:00:00Z",
            "x",
            None,
            Some("invalid_api_key"),
        );
        anon.client = None;
        ops.push(LedgerOp::Final(anon));
        // In flight: counted as a request, forwarded, no spend yet.
        ops.push(LedgerOp::Begin(Record {
            cost_reserved_micros: 40_000,
            ..rec(
                "f1",
                "2025-01-02T13:00:00Z",
                "beta",
                Some("carol"),
                Outcome::Forwarding,
            )
        }));
        for r in s.write_batch(&ops).unwrap() {
            r.unwrap();
        }
        s
    }

    fn q(group_by: GroupBy) -> UsageQuery {
        UsageQuery {
            group_by,
            ..UsageQuery::default()
        }
    }

    fn row(
        key: &str,
        requests: u64,
        forwarded: u64,
        images: u64,
        spend: i64,
        rej: &[(&str, u64)],
    ) -> UsageRow {
        UsageRow {
            key: key.into(),
            requests,
            forwarded,
            images,
            spend_micros: spend,
            rejections: rej.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..UsageRow::default()
        }
    }

    #[test]
    fn usage_by_model_with_tokens() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let answered =
            |id: &str, model: Option<&str>, images, usd, tokens: Option<(u64, u64)>| Record {
                model: model.map(Into::into),
                images_returned: Some(images),
                cost_reserved_micros: usd,
                cost_settled_micros: usd,
                input_tokens: tokens.map(|t| t.0),
                output_tokens: tokens.map(|t| t.1),
                cost_basis: Some(if tokens.is_some() {
                    CostBasis::Usage
                } else {
                    CostBasis::PerImage
                }),
                ..rec(
                    id,
                    "2025-01-01T10:00:00Z",
                    "acme",
                    Some("alice"),
                    Outcome::Answered,
                )
            };
        let mut ops = Vec::new();
        for r in [
            answered("d1", Some("dall-e-2"), 2, 40_000, None),
            answered("g1", Some("gpt-image-2"), 1, 68_300, Some((1_060, 2_000))),
            answered("g2", Some("gpt-image-2"), 2, 130_000, Some((500, 4_000))),
            answered("m1", Some("gpt-image-1-mini"), 1, 9_000, Some((100, 1_000))),
        ] {
            ops.push(LedgerOp::Begin(r.clone()));
            ops.push(LedgerOp::Complete(r));
        }
        // A rejection before the model was known.
        ops.push(LedgerOp::Final(Record {
            reason_code: Some("invalid_api_key".into()),
            ..rec(
                "r1",
                "2025-01-01T11:00:00Z",
                "acme",
                None,
                Outcome::Rejected,
            )
        }));
        for r in s.write_batch(&ops).unwrap() {
            r.unwrap();
        }
        let tokens = |mut r: UsageRow, input, output| {
            r.input_tokens = input;
            r.output_tokens = output;
            r
        };
        let rows = s.usage(&q(GroupBy::Model)).unwrap();
        assert_eq!(
            rows,
            [
                row("-", 1, 0, 0, 0, &[("invalid_api_key", 1)]),
                row("dall-e-2", 1, 1, 2, 40_000, &[]),
                tokens(row("gpt-image-1-mini", 1, 1, 1, 9_000, &[]), 100, 1_000),
                tokens(row("gpt-image-2", 2, 2, 3, 198_300, &[]), 1_560, 6_000),
            ]
        );
        let total = s.usage(&q(GroupBy::None)).unwrap();
        assert_eq!(
            (total[0].input_tokens, total[0].output_tokens),
            (1_660, 7_000)
        );

        let table = render_usage(&rows, Format::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("IN TOKENS  OUT TOKENS"), "{table}");
        assert!(lines[4].starts_with("gpt-image-2"), "{table}");
        assert!(
            lines[4].contains("0.198300") && lines[4].contains("1560"),
            "{table}"
        );
        assert!(
            lines[5].starts_with("TOTAL") && lines[5].contains("7000"),
            "{table}"
        );
        let csv = parse_csv(&render_usage(&rows, Format::Csv));
        assert_eq!(
            csv[4][..9],
            [
                "gpt-image-2",
                "2",
                "2",
                "3",
                "0.198300",
                "198300",
                "1560",
                "6000",
                "0"
            ]
        );
        let json: serde_json::Value =
            serde_json::from_str(&render_usage(&rows, Format::Json)).unwrap();
        assert_eq!(json[3]["input_tokens"], 1_560);
        assert_eq!(json[3]["output_tokens"], 6_000);
    }

    #[test]
    fn usage_by_user_client_day_and_total() {
        let s = usage_store();
        assert_eq!(
            s.usage(&q(GroupBy::User)).unwrap(),
            [
                row("-/-", 1, 0, 0, 0, &[("invalid_api_key", 1)]),
                row(
                    "acme/alice",
                    4,
                    2,
                    3,
                    120_000,
                    &[("rate_limit_exceeded", 2)]
                ),
                row("acme/bob", 2, 1, 1, 40_000, &[("invalid_image", 1)]),
                row("beta/-", 1, 0, 0, 0, &[("unspecified", 1)]),
                row("beta/alice", 1, 1, 4, 160_000, &[]),
                row("beta/carol", 1, 1, 0, 0, &[]),
            ]
        );
        assert_eq!(
            s.usage(&q(GroupBy::Client)).unwrap(),
            [
                row("-", 1, 0, 0, 0, &[("invalid_api_key", 1)]),
                row(
                    "acme",
                    6,
                    3,
                    4,
                    160_000,
                    &[("invalid_image", 1), ("rate_limit_exceeded", 2)]
                ),
                row("beta", 3, 2, 4, 160_000, &[("unspecified", 1)]),
            ]
        );
        assert_eq!(
            s.usage(&q(GroupBy::Day)).unwrap(),
            [
                row(
                    "2025-01-01",
                    4,
                    2,
                    3,
                    120_000,
                    &[("rate_limit_exceeded", 2)]
                ),
                row(
                    "2025-01-02",
                    5,
                    3,
                    5,
                    200_000,
                    &[("invalid_image", 1), ("unspecified", 1)]
                ),
                row("2025-01-03", 1, 0, 0, 0, &[("invalid_api_key", 1)]),
            ]
        );
        // Days in another zone: 23:30Z on the 1st is the 2nd in Tokyo (+09:00).
        let tokyo = UsageQuery {
            time_zone: Some(TimeZone::fixed(jiff::tz::offset(9))),
            ..q(GroupBy::Day)
        };
        let days: Vec<(String, u64)> = s
            .usage(&tokyo)
            .unwrap()
            .into_iter()
            .map(|r| (r.key, r.requests))
            .collect();
        assert_eq!(
            days,
            [
                ("2025-01-01".to_string(), 3),
                ("2025-01-02".to_string(), 6),
                ("2025-01-03".to_string(), 1)
            ]
        );
        assert_eq!(
            s.usage(&q(GroupBy::None)).unwrap(),
            [row(
                "total",
                10,
                5,
                8,
                320_000,
                &[
                    ("invalid_api_key", 1),
                    ("invalid_image", 1),
                    ("rate_limit_exceeded", 2),
                    ("unspecified", 1)
                ]
            )]
        );
    }

    #[test]
    fn usage_filters() {
        let s = usage_store();
        let ts = |t: &str| Some(t.parse::<Timestamp>().unwrap());
        // since inclusive, until exclusive.
        let window = UsageQuery {
            since: ts("2025-01-01T23:30:00Z"),
            until: ts("2025-01-02T12:00:00Z"),
            ..q(GroupBy::None)
        };
        assert_eq!(
            s.usage(&window).unwrap(),
            [row(
                "total",
                4,
                2,
                2,
                80_000,
                &[("invalid_image", 1), ("unspecified", 1)]
            )]
        );
        let alice = UsageQuery {
            user: Some("alice".into()),
            ..q(GroupBy::Client)
        };
        assert_eq!(
            s.usage(&alice).unwrap(),
            [
                row("acme", 4, 2, 3, 120_000, &[("rate_limit_exceeded", 2)]),
                row("beta", 1, 1, 4, 160_000, &[]),
            ]
        );
        let acme_alice_day1 = UsageQuery {
            client: Some("acme".into()),
            user: Some("alice".into()),
            until: ts("2025-01-02T00:00:00Z"),
            ..q(GroupBy::User)
        };
        assert_eq!(
            s.usage(&acme_alice_day1).unwrap(),
            [row(
                "acme/alice",
                4,
                2,
                3,
                120_000,
                &[("rate_limit_exceeded", 2)]
            )]
        );
        let nobody = UsageQuery {
            client: Some("nobody".into()),
            ..q(GroupBy::User)
        };
        assert!(s.usage(&nobody).unwrap().is_empty());
        let nobody_total = UsageQuery {
            group_by: GroupBy::None,
            ..nobody
        };
        assert_eq!(
            s.usage(&nobody_total).unwrap(),
            [row("total", 0, 0, 0, 0, &[])]
        );
    }

    #[test]
    fn renders() {
        let rows = usage_store().usage(&q(GroupBy::Client)).unwrap();
        let table = render_usage(&rows, Format::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(lines[0].starts_with("KEY "));
        assert!(lines[2].starts_with("acme"));
        assert!(lines[2].contains("0.160000"));
        assert!(lines[2].contains("invalid_image=1 rate_limit_exceeded=2"));
        assert!(lines[4].starts_with("TOTAL"));
        assert!(lines[4].contains("0.320000"));

        let csv = render_usage(&rows, Format::Csv);
        let parsed = parse_csv(&csv);
        assert_eq!(
            parsed[0],
            [
                "key",
                "requests",
                "forwarded",
                "images",
                "spend_usd",
                "spend_micros",
                "input_tokens",
                "output_tokens",
                "rejected",
                "rejected:invalid_api_key",
                "rejected:invalid_image",
                "rejected:rate_limit_exceeded",
                "rejected:unspecified"
            ]
        );
        assert_eq!(
            parsed[2],
            [
                "acme", "6", "3", "4", "0.160000", "160000", "0", "0", "3", "0", "1", "2", "0"
            ]
        );

        let json: serde_json::Value =
            serde_json::from_str(&render_usage(&rows, Format::Json)).unwrap();
        assert_eq!(json[1]["key"], "acme");
        assert_eq!(json[1]["spend_micros"], 160_000);
        assert_eq!(json[1]["spend_usd"], "0.160000");
        assert_eq!(json[1]["rejections"]["rate_limit_exceeded"], 2);
    }

    #[test]
    fn time_bounds() {
        let utc = TimeZone::UTC;
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(
            parse_time_bound("2025-01-02", &utc).unwrap(),
            t("2025-01-02T00:00:00Z")
        );
        let plus2 = TimeZone::fixed(jiff::tz::offset(2));
        assert_eq!(
            parse_time_bound("2025-01-02", &plus2).unwrap(),
            t("2025-01-01T22:00:00Z")
        );
        assert_eq!(
            parse_time_bound("2025-01-02T03:04:05+01:00", &utc).unwrap(),
            t("2025-01-02T02:04:05Z")
        );
        assert!(parse_time_bound("2025-01-02T03:04:05", &utc).is_err());
        assert!(parse_time_bound("yesterday", &utc).is_err());
        assert!(parse_time_bound("2025-02-30", &utc).is_err());
    }

    #[test]
    fn usd_formatting() {
        assert_eq!(micros_to_usd(0), "0.000000");
        assert_eq!(micros_to_usd(1_234_567), "1.234567");
        assert_eq!(micros_to_usd(-5), "-0.000005");
        assert_eq!(micros_to_usd(i64::MIN), "-9223372036854.775808");
        assert_eq!("csv".parse::<Format>().unwrap(), Format::Csv);
        assert_eq!(
            "jsonl".parse::<ExportFormat>().unwrap(),
            ExportFormat::Jsonl
        );
        assert!("xml".parse::<ExportFormat>().is_err());
    }
}
