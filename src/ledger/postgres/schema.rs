//! The schema: the numbered migrations and the version in `schema_migrations`.

use postgres::Client;

use crate::ledger::LedgerError;

/// Versioned migrations: `(version, description, SQL)`, applied in order, each once.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "ledger chain, records and quota use",
        "
CREATE TABLE ledger_chain (
    replica TEXT NOT NULL,
    seq BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    entry_json TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (replica, seq)
);
CREATE INDEX ledger_chain_request ON ledger_chain (request_id, replica, seq);
CREATE FUNCTION ledger_chain_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'ledger_chain is append-only'; END $$;
CREATE TRIGGER ledger_chain_append_only BEFORE UPDATE OR DELETE ON ledger_chain
    FOR EACH ROW EXECUTE FUNCTION ledger_chain_append_only();
CREATE TABLE records (
    request_id TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    seq BIGINT NOT NULL,
    received_at_us BIGINT NOT NULL,
    client TEXT,
    end_user TEXT,
    model TEXT,
    outcome TEXT NOT NULL,
    reason_code TEXT,
    images_returned BIGINT,
    cost_settled_micros BIGINT NOT NULL,
    input_tokens BIGINT,
    output_tokens BIGINT,
    forwarded BOOLEAN NOT NULL,
    record_json TEXT NOT NULL
);
CREATE INDEX records_received ON records (received_at_us);
CREATE INDEX records_client ON records (client, received_at_us);
CREATE INDEX records_user ON records (end_user, received_at_us);
CREATE INDEX records_forwarding ON records (replica) WHERE outcome = 'forwarding';
CREATE TABLE quota_usage (
    scope TEXT NOT NULL,
    period TEXT NOT NULL,
    images BIGINT NOT NULL DEFAULT 0,
    micros BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, period)
);
",
    ),
    (
        2,
        "records.upstream_key: the upstream key a request was sent with",
        "
ALTER TABLE records ADD COLUMN upstream_key TEXT;
CREATE INDEX records_upstream_key ON records (upstream_key, received_at_us);
",
    ),
    (
        3,
        "records by outcome (the operator page's recent requests)",
        "CREATE INDEX IF NOT EXISTS records_outcome ON records (outcome, received_at_us);",
    ),
    (
        4,
        "quota holds: one row per open reservation, reconciled with its record",
        "
CREATE TABLE quota_holds (
    request_id TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    scopes TEXT NOT NULL,
    day TEXT NOT NULL,
    month TEXT NOT NULL,
    reserved_images BIGINT NOT NULL,
    reserved_micros BIGINT NOT NULL,
    images BIGINT NOT NULL,
    micros BIGINT NOT NULL,
    settled BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX quota_holds_replica ON quota_holds (replica);
",
    ),
];

/// The version [`migrate`] brings a database to.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Apply the migrations not applied yet, in one transaction under an advisory lock (replicas
/// starting together take turns). Returns the schema version. Idempotent.
pub fn migrate(client: &mut Client) -> Result<i32, LedgerError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(8112420633)", &[])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             description TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )?;
    let current: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )?
        .get(0);
    if current > latest_version() {
        return Err(LedgerError::Store(format!(
            "PostgreSQL schema version {current} is newer than this build's {}",
            latest_version()
        )));
    }
    for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
            &[version, description],
        )?;
        tracing::info!(version, description, "ledger: PostgreSQL migration applied");
    }
    tx.commit()?;
    Ok(latest_version())
}

/// The schema version of a database (0: none), without changing anything.
pub fn schema_version(client: &mut Client) -> Result<i32, LedgerError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(versions, sorted);
        assert_eq!(latest_version(), *versions.last().unwrap());
    }
}
