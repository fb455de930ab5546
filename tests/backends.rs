//! One suite of quota-store and ledger-store behaviour, run against every backend: SQLite (in
//! a plain `cargo test`) and PostgreSQL (ignored unless a server is at `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`; each run in a schema of its own). Each check is
//! written once, over a factory that opens the backend.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};
use support::pg::Schema;

use imagegate::clock::Clock;
use imagegate::config::{ClientConfig, Config, hash_key};
use imagegate::error::GatewayError;
use imagegate::ledger::{GroupBy, LedgerOp};
use imagegate::ledger::{
    LedgerError, LedgerStore, Outcome, PostgresStore, Record, SqliteStore, UsageQuery,
};
use imagegate::limits::EndUser;
use imagegate::limits::quota::{QuotaStore, client_scope, user_scope};
use imagegate::limits::spec::QuotaSpec;

// ---- backends ------------------------------------------------------------------------------

/// Opens a quota store for a configuration and a clock; each call a fresh, empty one.
type OpenQuota<'a> = &'a dyn Fn(Arc<Config>, Clock) -> QuotaStore;
/// Opens THE ledger store of a test (the same data each call, as a restarted process would).
type OpenLedger<'a> = &'a dyn Fn() -> Box<dyn LedgerStore>;

fn sqlite_quota(config: Arc<Config>, clock: Clock) -> QuotaStore {
    QuotaStore::open_in_memory(config, clock).unwrap()
}

fn postgres_quota(config: Arc<Config>, clock: Clock) -> QuotaStore {
    // A schema per store, dropped by the test at its end.
    let schema = Schema::new();
    let store = QuotaStore::open_postgres(schema.settings_pooled(8), config, clock).unwrap();
    KEEP.lock().unwrap().push(schema);
    store
}

/// Schemas of the PostgreSQL quota stores (statics are never dropped: the test that created
/// them calls [`drop_schemas`]).
static KEEP: std::sync::Mutex<Vec<Schema>> = std::sync::Mutex::new(Vec::new());

fn drop_schemas() {
    KEEP.lock().unwrap().clear();
}

// ---- the quota suite -----------------------------------------------------------------------

fn quota_config(spec: QuotaSpec) -> Arc<Config> {
    let mut c = Config::default();
    c.quotas.per_user = spec;
    c.clients.push(ClientConfig {
        name: "a".into(),
        key_hash: hash_key("a"),
        ..Default::default()
    });
    Arc::new(c)
}

/// 2026-11-29T23:00:00Z.
fn late_evening() -> Clock {
    Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_993_200))
}

fn who(u: &str) -> EndUser {
    EndUser {
        client: "a".into(),
        user: Some(u.into()),
    }
}

fn quota_suite(open: OpenQuota<'_>) {
    reserve_refuse_refund(open);
    spend_quota_and_rollover(open);
    parallel_reservations_never_overspend(open);
    a_refusal_reserves_nothing_in_any_scope(open);
}

fn reserve_refuse_refund(open: OpenQuota<'_>) {
    let s = open(
        quota_config(QuotaSpec {
            images_per_day: Some(10),
            ..Default::default()
        }),
        late_evening(),
    );
    let r = s
        .reserve(&next_request_id(), &who("u"), 8, 160_000)
        .unwrap();
    let GatewayError::QuotaExceeded {
        message,
        retry_after,
    } = s
        .reserve(&next_request_id(), &who("u"), 3, 60_000)
        .unwrap_err()
    else {
        panic!("not a quota refusal")
    };
    assert!(
        message.contains("images per day quota of user 'u' of client 'a'"),
        "{message}"
    );
    assert!(message.contains("is 10 and 8 is already used"), "{message}");
    assert_eq!(retry_after, Some(Duration::from_secs(3600)), "midnight UTC");
    s.settle(&r, 5, 100_000).unwrap(); // fewer images returned: 3 refunded
    assert!(s.reserve(&next_request_id(), &who("u"), 3, 60_000).is_ok());
    assert!(
        s.reserve(&next_request_id(), &who("other"), 10, 0).is_ok(),
        "users are isolated"
    );
    let u = s.usage(&client_scope("a")).unwrap();
    assert_eq!((u.images_day, u.micros_day), (18, 160_000));
    let u = s.usage(&user_scope(&who("u")).unwrap()).unwrap();
    assert_eq!((u.images_day, u.images_month), (8, 8));
}

fn spend_quota_and_rollover(open: OpenQuota<'_>) {
    let clock = late_evening();
    let s = open(
        quota_config(QuotaSpec {
            usd_per_day: Some(0.05),
            ..Default::default()
        }),
        clock.clone(),
    );
    let price = |size, n| s.price("dall-e-2", size, n);
    assert!(
        s.reserve(&next_request_id(), &who("u"), 2, price("1024x1024", 2))
            .is_ok()
    );
    let err = s
        .reserve(&next_request_id(), &who("u"), 1, price("1024x1024", 1))
        .unwrap_err();
    assert!(err.parts().message.contains("spend per day"), "{err:?}");
    assert!(
        s.reserve(&next_request_id(), &who("u"), 1, price("256x256", 1))
            .is_err(),
        "0.04 + 0.016 > 0.05"
    );
    clock.advance(Duration::from_secs(3600));
    assert!(
        s.reserve(&next_request_id(), &who("u"), 2, price("1024x1024", 2))
            .is_ok(),
        "a new day"
    );
}

fn parallel_reservations_never_overspend(open: OpenQuota<'_>) {
    let s = open(
        quota_config(QuotaSpec {
            images_per_month: Some(100),
            ..Default::default()
        }),
        late_evening(),
    );
    let admitted = AtomicU32::new(0);
    std::thread::scope(|t| {
        for _ in 0..8 {
            t.spawn(|| {
                for _ in 0..20 {
                    if s.reserve(&next_request_id(), &who("u"), 3, 0).is_ok() {
                        admitted.fetch_add(3, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.into_inner(), 99, "33 reservations of 3 fit in 100");
    let u = s.usage(&user_scope(&who("u")).unwrap()).unwrap();
    assert_eq!(u.images_month, 99);
}

fn a_refusal_reserves_nothing_in_any_scope(open: OpenQuota<'_>) {
    // The user's quota admits, the client's refuses: the user's part is rolled back too.
    let mut c = (*quota_config(QuotaSpec {
        images_per_day: Some(100),
        ..Default::default()
    }))
    .clone();
    c.quotas.per_client = QuotaSpec {
        images_per_day: Some(5),
        ..Default::default()
    };
    let s = open(Arc::new(c), late_evening());
    assert!(s.reserve(&next_request_id(), &who("u"), 4, 0).is_ok());
    let err = s.reserve(&next_request_id(), &who("u"), 2, 0).unwrap_err();
    let message = err.parts().message;
    assert!(message.contains("quota of client 'a'"), "{message}");
    let u = s.usage(&user_scope(&who("u")).unwrap()).unwrap();
    assert_eq!(u.images_day, 4, "the refused request reserved nothing");
    assert_eq!(s.usage(&client_scope("a")).unwrap().images_day, 4);
}

// ---- the ledger-store suite ----------------------------------------------------------------

fn ok(results: Vec<Result<(), LedgerError>>) {
    for r in results {
        r.unwrap();
    }
}

fn begun(id: &str) -> Record {
    Record {
        request_id: id.into(),
        received_at: "2025-01-01T00:00:00Z".parse().unwrap(),
        client: Some("acme".into()),
        user: Some("alice".into()),
        model: Some("dall-e-2".into()),
        cost_reserved_micros: 40_000,
        ..Record::default()
    }
}

fn answered(id: &str) -> Record {
    Record {
        outcome: Outcome::Answered,
        status: Some(200),
        images_returned: Some(1),
        cost_settled_micros: 40_000,
        input_tokens: Some(10),
        output_tokens: Some(20),
        ..begun(id)
    }
}

fn ledger_suite(open: OpenLedger<'_>) {
    let mut s = open();
    assert_eq!(s.recover().unwrap(), 0);

    // Begin then Complete: one record, forwarded; Final: not forwarded; Complete without
    // Begin: kept, not forwarded.
    ok(s.write_batch(&[LedgerOp::Begin(answered("a"))]).unwrap());
    let got = s.get("a").unwrap().unwrap();
    assert_eq!((got.outcome, got.forwarded), (Outcome::Forwarding, true));
    ok(s.write_batch(&[LedgerOp::Complete(answered("a"))]).unwrap());
    assert_eq!(
        s.get("a").unwrap().unwrap(),
        Record {
            forwarded: true,
            ..answered("a")
        }
    );
    let rejected = Record {
        outcome: Outcome::Rejected,
        reason_code: Some("rate_limit_exceeded".into()),
        status: Some(429),
        forwarded: true, // overwritten by the store
        user: Some("bob".into()),
        ..begun("r")
    };
    ok(s.write_batch(&[LedgerOp::Final(rejected.clone())]).unwrap());
    assert!(!s.get("r").unwrap().unwrap().forwarded);
    ok(s.write_batch(&[LedgerOp::Complete(Record {
        outcome: Outcome::ClientGone,
        ..begun("g")
    })])
    .unwrap());
    assert!(!s.get("g").unwrap().unwrap().forwarded);
    assert_eq!(s.get("nope").unwrap(), None);

    // Refusals skip the op, not the batch.
    let results = s
        .write_batch(&[
            LedgerOp::Begin(begun("b")),
            LedgerOp::Begin(begun("b")), // duplicate
            LedgerOp::Final(Record::new("", jiff::Timestamp::UNIX_EPOCH)), // invalid
            LedgerOp::Final(Record {
                outcome: Outcome::Forwarding, // a final cannot be forwarding
                ..begun("x")
            }),
            LedgerOp::Complete(answered("a")), // already final
            LedgerOp::Final(rejected),         // already recorded
            LedgerOp::Begin(begun("c")),
        ])
        .unwrap();
    let refused: Vec<bool> = results
        .iter()
        .map(|r| matches!(r, Err(LedgerError::Rejected(_))))
        .collect();
    assert_eq!(refused, [false, true, true, true, true, true, false]);
    assert_eq!(s.get("x").unwrap(), None);
    let v = s.verify().unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!((v.entries, v.records), (6, 5));

    // A "crash" with b and c forwarding: the reopened store recovers them, once.
    drop(s);
    let mut s = open();
    assert_eq!(s.recover().unwrap(), 2);
    for id in ["b", "c"] {
        let r = s.get(id).unwrap().unwrap();
        assert_eq!(r.outcome, Outcome::Unknown);
        assert!(r.forwarded);
        assert_eq!(
            r.cost_settled_micros, 40_000,
            "an unknown counts its reservation"
        );
    }
    assert_eq!(s.recover().unwrap(), 0);
    let late = s.write_batch(&[LedgerOp::Complete(answered("b"))]).unwrap();
    assert!(matches!(late[0], Err(LedgerError::Rejected(_))), "final");

    // Reports and exports.
    let rows = s
        .usage(&UsageQuery {
            group_by: GroupBy::User,
            ..UsageQuery::default()
        })
        .unwrap();
    let alice = rows.iter().find(|r| r.key == "acme/alice").unwrap();
    assert_eq!((alice.requests, alice.forwarded, alice.images), (4, 3, 1));
    assert_eq!(alice.spend_micros, 120_000);
    assert_eq!((alice.input_tokens, alice.output_tokens), (10, 20));
    let bob = rows.iter().find(|r| r.key == "acme/bob").unwrap();
    assert_eq!(bob.rejections.get("rate_limit_exceeded"), Some(&1));
    let mut ids = Vec::new();
    s.export(
        &UsageQuery {
            user: Some("alice".into()),
            ..UsageQuery::default()
        },
        &mut |r| {
            ids.push(r.request_id.clone());
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(ids, ["a", "b", "c", "g"]);
    let v = s.verify().unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!((v.entries, v.records, v.head.unwrap().seq), (8, 5, 8));
}

// ---- the runs ------------------------------------------------------------------------------

#[test]
fn quota_store_on_sqlite() {
    quota_suite(&sqlite_quota);
}

#[test]
#[ignore = "needs PostgreSQL at DATABASE_URL"]
fn quota_store_on_postgres() {
    quota_suite(&postgres_quota);
    drop_schemas();
}

#[test]
fn ledger_store_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    ledger_suite(&|| Box::new(SqliteStore::open(&path).unwrap()));
}

#[test]
#[ignore = "needs PostgreSQL at DATABASE_URL"]
fn ledger_store_on_postgres() {
    let schema = Schema::new();
    ledger_suite(&|| Box::new(PostgresStore::open(schema.settings_pooled(8), "suite").unwrap()));
}

/// A request id no other reservation of this process uses (each reservation is a hold row
/// keyed by its request id).
fn next_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("req_backends_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}
