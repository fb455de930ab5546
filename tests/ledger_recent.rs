//! `LedgerStore::recent` and `LedgerStore::chain_status` (the operator page's queries), the same
//! checks on both backends: SQLite (always) and PostgreSQL (ignored unless a server is at
//! `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; a schema of its own).

use std::time::Duration;

use imagegate::ledger::{
    LedgerOp, LedgerStore, Outcome, PgSettings, PostgresStore, RecentQuery, Record, SqliteStore,
};

/// 24 records: 2 clients × 3 users × 4 seconds apart, every fourth rejected, two with the same
/// time (the request id breaks the tie), one begun and not finished.
fn records() -> Vec<LedgerOp> {
    let mut ops = Vec::new();
    for i in 0..24u32 {
        // Records 10 and 11 share a timestamp.
        let secs = if i == 11 { 10 } else { i };
        let r = Record {
            request_id: format!("req_{i:02}"),
            received_at: format!("2026-03-04T05:06:{secs:02}Z").parse().unwrap(),
            client: Some(["web", "cli"][(i % 2) as usize].into()),
            user: Some(["ann", "ben", "cy"][(i % 3) as usize].into()),
            outcome: if i % 4 == 3 {
                Outcome::Rejected
            } else {
                Outcome::Answered
            },
            status: Some(if i % 4 == 3 { 400 } else { 200 }),
            images_returned: Some(1),
            cost_settled_micros: 1_000 + i64::from(i),
            ..Record::default()
        };
        ops.push(if i == 23 {
            LedgerOp::Begin(r)
        } else {
            LedgerOp::Final(r)
        });
    }
    ops
}

fn ids(store: &dyn LedgerStore, q: RecentQuery) -> Vec<String> {
    store
        .recent(&q)
        .unwrap()
        .into_iter()
        .map(|r| r.request_id)
        .collect()
}

/// The ids `0..24` in the order `recent` must give them (newest first), filtered.
fn want(keep: impl Fn(u32) -> bool) -> Vec<String> {
    let mut v: Vec<u32> = (0..24).filter(|&i| keep(i)).collect();
    // Time descending, then id descending: 11 (at :10) comes before 10 (at :10), both after 12.
    v.sort_by_key(|&i| std::cmp::Reverse((if i == 11 { 10 } else { i }, i)));
    v.into_iter().map(|i| format!("req_{i:02}")).collect()
}

fn check(store: &mut dyn LedgerStore) {
    let empty = store.chain_status().unwrap();
    assert_eq!((empty.head, empty.entries, empty.records), (None, 0, 0));
    for r in store.write_batch(&records()).unwrap() {
        r.unwrap();
    }
    let all = |limit| RecentQuery {
        limit,
        ..RecentQuery::default()
    };
    assert_eq!(ids(store, all(100)), want(|_| true));
    assert_eq!(ids(store, all(3)), want(|_| true)[..3]);
    let rec = store.recent(&all(1)).unwrap().remove(0);
    assert_eq!(rec.outcome, Outcome::Forwarding, "req_23 is in flight");

    let q = |f: &dyn Fn(&mut RecentQuery)| {
        let mut q = all(100);
        f(&mut q);
        q
    };
    assert_eq!(
        ids(store, q(&|q| q.client = Some("web".into()))),
        want(|i| i % 2 == 0)
    );
    assert_eq!(
        ids(store, q(&|q| q.user = Some("ben".into()))),
        want(|i| i % 3 == 1)
    );
    assert_eq!(
        ids(store, q(&|q| q.outcome = Some(Outcome::Rejected))),
        want(|i| i % 4 == 3 && i != 23)
    );
    assert_eq!(
        ids(
            store,
            q(&|q| {
                q.client = Some("cli".into());
                q.user = Some("ann".into());
                q.outcome = Some(Outcome::Answered);
            })
        ),
        want(|i| i % 2 == 1 && i % 3 == 0 && i % 4 != 3 && i != 23)
    );
    assert_eq!(
        ids(
            store,
            q(&|q| {
                q.since = Some("2026-03-04T05:06:05Z".parse().unwrap());
                q.until = Some("2026-03-04T05:06:10Z".parse().unwrap());
            })
        ),
        want(|i| (5..10).contains(&i))
    );

    // Paging through everything, 5 at a time, across the tie at :10.
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = ids(
            store,
            RecentQuery {
                before: before.clone(),
                limit: 5,
                ..RecentQuery::default()
            },
        );
        seen.extend(page.iter().cloned());
        if page.len() < 5 {
            break;
        }
        before = page.last().cloned();
        assert!(seen.len() <= 24, "paging does not end");
    }
    assert_eq!(seen, want(|_| true));
    assert!(
        ids(store, q(&|q| q.before = Some("req_nope".into()))).is_empty(),
        "an unknown cursor selects nothing"
    );

    let status = store.chain_status().unwrap();
    assert_eq!(status.records, 24);
    assert_eq!(status.entries, 24);
    let verified = store.verify().unwrap();
    assert!(verified.is_ok());
    assert_eq!(status.head, verified.head);
    assert_eq!(status.entries, verified.entries);
}

#[test]
fn recent_and_chain_status_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut store = SqliteStore::open(&path).unwrap();
    check(&mut store);
    // A reader (what the admin listener uses) answers the same.
    let reader = SqliteStore::open_reader(&path).unwrap();
    assert_eq!(
        ids(
            &reader,
            RecentQuery {
                limit: 100,
                ..RecentQuery::default()
            }
        ),
        want(|_| true)
    );
    assert_eq!(
        reader.chain_status().unwrap(),
        store.chain_status().unwrap()
    );
    // The outcome filter has an index.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let plan: String = conn
        .query_row(
            "EXPLAIN QUERY PLAN SELECT request_id FROM records WHERE outcome = 'rejected' \
             ORDER BY received_at_us DESC, request_id DESC LIMIT 5",
            [],
            |r| r.get(3),
        )
        .unwrap();
    assert!(plan.contains("records_outcome"), "{plan}");
}

#[test]
#[ignore = "needs PostgreSQL at DATABASE_URL"]
fn recent_and_chain_status_on_postgres() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("imagegate_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).expect("PostgreSQL");
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let settings = PgSettings {
        url: url.clone(),
        schema: Some(schema.clone()),
        pool_size: 2,
        connect_timeout: Duration::from_secs(5),
    };
    let result = std::panic::catch_unwind(|| {
        let mut store = PostgresStore::open(settings.clone(), "replica-a").unwrap();
        check(&mut store);
        // A second replica's chain is counted and listed; the head stays this replica's.
        let mut b = PostgresStore::open(settings.clone(), "replica-b").unwrap();
        let extra = Record {
            request_id: "req_b".into(),
            received_at: "2026-03-04T06:00:00Z".parse().unwrap(),
            outcome: Outcome::Rejected,
            ..Record::default()
        };
        b.write_batch(&[LedgerOp::Final(extra)]).unwrap()[0]
            .clone()
            .unwrap();
        let reader = PostgresStore::reader(settings.clone(), "replica-a");
        let s = reader.chain_status().unwrap();
        assert_eq!((s.entries, s.records), (25, 25));
        assert_eq!(s.chains.len(), 2);
        assert_eq!(s.head.as_ref().unwrap().seq, 24);
        assert_eq!(
            ids(
                &reader,
                RecentQuery {
                    limit: 1,
                    ..RecentQuery::default()
                }
            ),
            ["req_b"]
        );
    });
    let _ = admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
