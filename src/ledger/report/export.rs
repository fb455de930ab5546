//! [`write_export`]: the records themselves, as JSON Lines or CSV.

use std::io::Write;

use super::{ExportFormat, push_csv_line};
use crate::ledger::LedgerError;
use crate::ledger::record::Record;
use crate::ledger::store::{LedgerStore, UsageQuery};

/// Header of the CSV export: the record's JSON field names, in order.
pub const CSV_COLUMNS: [&str; 43] = [
    "request_id",
    "received_at",
    "client",
    "user",
    "client_addr",
    "outcome",
    "reason_code",
    "reason_param",
    "reason_message",
    "status",
    "upstream_status",
    "upstream_request_id",
    "model",
    "n",
    "size",
    "response_format",
    "images_returned",
    "cost_reserved_micros",
    "cost_settled_micros",
    "image_sha256",
    "image_bytes",
    "image_width",
    "image_height",
    "mask_sha256",
    "mask_bytes",
    "mask_width",
    "mask_height",
    "prompt",
    "total_ms",
    "upstream_ms",
    "quality",
    "output_format",
    "input_images",
    "stream",
    "input_tokens",
    "input_text_tokens",
    "input_image_tokens",
    "output_tokens",
    "total_tokens",
    "usage_extra",
    "cost_basis",
    "upstream_key",
    "forwarded",
];

pub(super) fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(T::to_string).unwrap_or_default()
}

pub(super) fn csv_cells(r: &Record) -> [String; 43] {
    [
        r.request_id.clone(),
        r.received_at.to_string(),
        opt(&r.client),
        opt(&r.user),
        opt(&r.client_addr),
        r.outcome.as_str().to_owned(),
        opt(&r.reason_code),
        opt(&r.reason_param),
        opt(&r.reason_message),
        opt(&r.status),
        opt(&r.upstream_status),
        opt(&r.upstream_request_id),
        opt(&r.model),
        opt(&r.n),
        opt(&r.size),
        opt(&r.response_format),
        opt(&r.images_returned),
        r.cost_reserved_micros.to_string(),
        r.cost_settled_micros.to_string(),
        opt(&r.image_sha256),
        opt(&r.image_bytes),
        opt(&r.image_width),
        opt(&r.image_height),
        opt(&r.mask_sha256),
        opt(&r.mask_bytes),
        opt(&r.mask_width),
        opt(&r.mask_height),
        opt(&r.prompt),
        opt(&r.total_ms),
        opt(&r.upstream_ms),
        opt(&r.quality),
        opt(&r.output_format),
        opt(&r.input_images),
        opt(&r.stream),
        opt(&r.input_tokens),
        opt(&r.input_text_tokens),
        opt(&r.input_image_tokens),
        opt(&r.output_tokens),
        opt(&r.total_tokens),
        opt(&r.usage_extra),
        opt(&r.cost_basis),
        opt(&r.upstream_key),
        r.forwarded.to_string(),
    ]
}

/// Write the records matching `q` (see [`LedgerStore::export`]) to `out`. Returns how many.
pub fn write_export(
    store: &dyn LedgerStore,
    q: &UsageQuery,
    format: ExportFormat,
    out: &mut dyn Write,
) -> Result<u64, LedgerError> {
    let mut n = 0u64;
    let mut line = String::new();
    if format == ExportFormat::Csv {
        push_csv_line(&mut line, CSV_COLUMNS.into_iter());
        out.write_all(line.as_bytes())?;
    }
    store.export(q, &mut |r| {
        line.clear();
        match format {
            ExportFormat::Jsonl => {
                line = serde_json::to_string(r)
                    .map_err(|e| LedgerError::Store(format!("cannot serialize a record: {e}")))?;
                line.push('\n');
            }
            ExportFormat::Csv => {
                let cells = csv_cells(r);
                push_csv_line(&mut line, cells.iter().map(String::as_str));
            }
        }
        out.write_all(line.as_bytes())?;
        n += 1;
        Ok(())
    })?;
    out.flush()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Outcome;
    use crate::ledger::record::CostBasis;
    use crate::ledger::report::neutralize;
    use crate::ledger::report::tests::parse_csv;
    use crate::ledger::sqlite::SqliteStore;
    use crate::ledger::store::LedgerOp;
    use crate::ledger::test_support::{rec, sample};

    fn record_from_csv(header: &[String], cells: &[String]) -> Record {
        let mut obj = serde_json::Map::new();
        for (name, cell) in header.iter().zip(cells) {
            // Undo the spreadsheet neutralization of the writer.
            let cell = &match cell.strip_prefix('\'') {
                Some(rest) if rest.starts_with(['=', '+', '-', '@', '\t', '\r']) => rest.to_owned(),
                _ => cell.clone(),
            };
            let v = if cell.is_empty() {
                serde_json::Value::Null
            } else if let Ok(n) = cell.parse::<i64>() {
                // Numeric columns; text columns in the test data are never all digits.
                serde_json::Value::from(n)
            } else if let Ok(n) = cell.parse::<u64>() {
                serde_json::Value::from(n)
            } else if let Ok(b) = cell.parse::<bool>() {
                serde_json::Value::from(b)
            } else {
                serde_json::Value::from(cell.clone())
            };
            obj.insert(name.clone(), v);
        }
        serde_json::from_value(serde_json::Value::Object(obj)).unwrap()
    }

    fn export_store() -> (SqliteStore, Vec<Record>) {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let mut full = sample();
        full.reason_code = Some("upstream_error".into());
        full.reason_param = Some("image".into());
        full.reason_message = Some("say \"hi\", then\nnewline; é ✓".into());
        full.prompt = Some("=HYPERLINK(\"x\"), a prompt\r\nover lines".into());
        full.mask_sha256 = Some("cd".repeat(32));
        full.mask_bytes = Some(77);
        full.mask_width = Some(1024);
        full.mask_height = Some(1024);
        full.cost_settled_micros = -3;
        full.forwarded = true;
        let sparse = Record {
            reason_code: Some("invalid_api_key".into()),
            status: Some(401),
            ..Record::new("req_sparse", "2025-03-04T05:06:08Z".parse().unwrap())
        };
        let sparse = Record {
            outcome: Outcome::Rejected,
            ..sparse
        };
        let later = Record {
            stream: Some(true),
            cost_basis: Some(CostBasis::Estimated),
            ..rec(
                "req_later",
                "2025-03-05T00:00:00Z",
                "beta",
                Some("u"),
                Outcome::ClientGone,
            )
        };
        for r in s
            .write_batch(&[
                LedgerOp::Begin(full.clone()),
                LedgerOp::Complete(full.clone()),
                LedgerOp::Final(later.clone()),
                LedgerOp::Final(sparse.clone()),
            ])
            .unwrap()
        {
            r.unwrap();
        }
        (s, vec![full, sparse, later])
    }

    #[test]
    fn export_jsonl_round_trips() {
        let (s, expected) = export_store();
        let mut out = Vec::new();
        let n = write_export(&s, &UsageQuery::default(), ExportFormat::Jsonl, &mut out).unwrap();
        assert_eq!(n, 3);
        let text = String::from_utf8(out).unwrap();
        let back: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, expected); // ordered by received_at
        assert!(text.contains(r#""received_at":"2025-03-04T05:06:07.123456Z""#));

        // Filters and limit apply.
        let mut out = Vec::new();
        let q = UsageQuery {
            client: Some("beta".into()),
            ..UsageQuery::default()
        };
        assert_eq!(
            write_export(&s, &q, ExportFormat::Jsonl, &mut out).unwrap(),
            1
        );
        let mut out = Vec::new();
        let q = UsageQuery {
            limit: Some(2),
            ..UsageQuery::default()
        };
        assert_eq!(
            write_export(&s, &q, ExportFormat::Jsonl, &mut out).unwrap(),
            2
        );
    }

    #[test]
    fn csv_cells_that_a_spreadsheet_would_run_are_neutralized() {
        for (cell, out) in [
            ("=1+1", "'=1+1"),
            ("+SUM(A1)", "'+SUM(A1)"),
            ("-2+3", "'-2+3"),
            ("@cmd", "'@cmd"),
            ("\tx", "'\tx"),
            ("\rx", "'\rx"),
            ("-3", "-3"),
            ("-0.000003", "-0.000003"),
            ("a=b", "a=b"),
            ("", ""),
        ] {
            assert_eq!(neutralize(cell), out, "{cell:?}");
        }
        let mut line = String::new();
        push_csv_line(
            &mut line,
            ["=HYPERLINK(\"x\")", "@u", "-5", "plain"].into_iter(),
        );
        assert_eq!(line, "\"'=HYPERLINK(\"\"x\"\")\",'@u,-5,plain\n");
    }

    #[test]
    fn export_csv_round_trips() {
        let (s, expected) = export_store();
        let mut out = Vec::new();
        write_export(&s, &UsageQuery::default(), ExportFormat::Csv, &mut out).unwrap();
        let rows = parse_csv(&String::from_utf8(out).unwrap());
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0], CSV_COLUMNS.map(str::to_owned));
        let back: Vec<Record> = rows[1..]
            .iter()
            .map(|cells| record_from_csv(&rows[0], cells))
            .collect();
        assert_eq!(back, expected);
        let cell = |row: usize, name: &str| {
            let i = CSV_COLUMNS.iter().position(|c| *c == name).unwrap();
            rows[row][i].as_str()
        };
        assert_eq!(
            (
                cell(1, "quality"),
                cell(1, "input_images"),
                cell(1, "stream")
            ),
            ("high", "2", "false")
        );
        assert!(
            cell(1, "prompt").starts_with("'=HYPERLINK"),
            "a formula prompt is neutralized: {}",
            cell(1, "prompt")
        );
        assert_eq!(cell(1, "cost_settled_micros"), "-3", "numbers stay numbers");
        assert_eq!(
            (cell(1, "input_tokens"), cell(1, "total_tokens")),
            ("1060", "3060")
        );
        assert_eq!(
            cell(1, "usage_extra"),
            r#"{"input_tokens_details":{"cached_tokens_details":{"text_tokens":0}}}"#
        );
        assert_eq!(
            (
                cell(1, "cost_basis"),
                cell(2, "cost_basis"),
                cell(3, "cost_basis")
            ),
            ("usage", "", "estimated")
        );
        // The CSV header is the JSON field order.
        let json = serde_json::to_string(&expected[1]).unwrap();
        let positions: Vec<usize> = CSV_COLUMNS
            .iter()
            .map(|c| json.find(&format!("\"{c}\":")).unwrap())
            .collect();
        assert!(positions.is_sorted(), "{json}");
        assert_eq!(json.matches("\":").count(), CSV_COLUMNS.len());
    }

    #[test]
    fn export_stops_at_a_failing_writer() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("pipe closed"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (s, _) = export_store();
        let err =
            write_export(&s, &UsageQuery::default(), ExportFormat::Jsonl, &mut Broken).unwrap_err();
        assert!(matches!(err, LedgerError::Io(ref m) if m.contains("pipe closed")));
    }
}
