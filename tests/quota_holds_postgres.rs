//! Quota reservations and the ledger agree after a crash, on PostgreSQL: each reservation is
//! a `quota_holds` row of its replica, and start-up recovery (after the ledger's) makes every row
//! a crash left agree with its record, touching no other replica's rows. Needs a server at
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`, trust authentication);
//! ignored otherwise. Each test works in a schema of its own.

mod support;

use std::sync::Arc;
use std::time::SystemTime;
use support::pg::Schema;

use imagegate::clock::Clock;
use imagegate::config::{ClientConfig, Config, hash_key};
use imagegate::ledger::{LedgerOp, LedgerStore, Outcome, PostgresStore, Record};
use imagegate::limits::EndUser;
use imagegate::limits::quota::{HoldRecovery, QuotaStore};

fn config(replica: &str) -> Arc<Config> {
    let mut c = Config::default();
    c.ledger.replica_id = Some(replica.into());
    c.clients.push(ClientConfig {
        name: "acme".into(),
        key_hash: hash_key("acme-key"),
        ..Default::default()
    });
    Arc::new(c)
}

fn who(u: &str) -> EndUser {
    EndUser {
        client: "acme".into(),
        user: Some(u.into()),
    }
}

fn record(id: &str, outcome: Outcome, settled: i64, images: Option<u32>) -> Record {
    Record {
        request_id: id.into(),
        received_at: "2026-03-04T05:06:07Z".parse().unwrap(),
        client: Some("acme".into()),
        user: Some(id.into()),
        outcome,
        n: Some(2),
        cost_reserved_micros: 40_000,
        cost_settled_micros: settled,
        images_returned: images,
        ..Record::default()
    }
}

fn write(l: &mut PostgresStore, op: LedgerOp) {
    for r in l.write_batch(&[op]).unwrap() {
        r.unwrap();
    }
}

#[test]
#[ignore = "needs PostgreSQL at DATABASE_URL"]
fn recovery_makes_quota_agree_with_the_ledger_and_keeps_to_its_replica() {
    let schema = Schema::new();
    let clock = Clock::manual(SystemTime::now());
    let micros =
        |q: &QuotaStore, u: &str| q.usage(&format!("user:acme\u{1f}{u}")).unwrap().micros_day;
    {
        let mut ledger = PostgresStore::open(schema.settings(), "r1").unwrap();
        let q = QuotaStore::open_postgres(schema.settings(), config("r1"), clock.clone()).unwrap();
        // a: reserved, killed before its `forwarding` record.
        q.reserve("a", &who("a"), 2, 40_000).unwrap();
        // b: forwarding when killed.
        q.reserve("b", &who("b"), 2, 40_000).unwrap();
        write(
            &mut ledger,
            LedgerOp::Begin(record("b", Outcome::Forwarding, 0, None)),
        );
        // c: settled to one image, killed before its completed record.
        let rc = q.reserve("c", &who("c"), 2, 40_000).unwrap();
        write(
            &mut ledger,
            LedgerOp::Begin(record("c", Outcome::Forwarding, 0, None)),
        );
        q.settle(&rc, 1, 20_000).unwrap();
        // d: settled, then completed: the writer deletes its hold.
        let rd = q.reserve("d", &who("d"), 2, 40_000).unwrap();
        write(
            &mut ledger,
            LedgerOp::Begin(record("d", Outcome::Forwarding, 0, None)),
        );
        q.settle(&rd, 1, 20_000).unwrap();
        write(
            &mut ledger,
            LedgerOp::Complete(record("d", Outcome::Answered, 20_000, Some(1))),
        );
        // e: rejected; its refund comes after the record and deletes the hold.
        let re = q.reserve("e", &who("e"), 2, 40_000).unwrap();
        write(
            &mut ledger,
            LedgerOp::Final(record("e", Outcome::Rejected, 0, None)),
        );
        q.settle(&re, 0, 0).unwrap();
        assert_eq!(q.open_holds().unwrap(), 3, "a, b and c");
    }
    // Another replica, alive, with a reservation in flight (no record yet).
    let q2 = QuotaStore::open_postgres(schema.settings(), config("r2"), clock.clone()).unwrap();
    q2.reserve("z", &who("z"), 1, 10_000).unwrap();

    // r1 restarts: the ledger first, then the quota.
    let mut ledger = PostgresStore::open(schema.settings(), "r1").unwrap();
    assert_eq!(ledger.recover().unwrap(), 2);
    let q = QuotaStore::open_postgres(schema.settings(), config("r1"), clock).unwrap();
    let report = q.recover().unwrap();
    assert_eq!(
        (report.refunded, report.reconciled, report.left),
        (1, 2, 0),
        "{report:?}"
    );
    assert_eq!(q.open_holds().unwrap(), 0);
    for (u, expected) in [
        ("a", 0),
        ("b", 40_000),
        ("c", 40_000),
        ("d", 20_000),
        ("e", 0),
    ] {
        assert_eq!(micros(&q, u), expected, "{u}");
    }
    assert_eq!(
        micros(&q, "z"),
        10_000,
        "the other replica's reservation is not refunded"
    );
    assert_eq!(q2.open_holds().unwrap(), 1);
    let client = q.usage("client:acme").unwrap();
    assert_eq!(client.micros_day, 40_000 + 40_000 + 20_000 + 10_000);
    assert_eq!(q.recover().unwrap(), HoldRecovery::default(), "idempotent");
}
