//! A PostgreSQL schema of a test's own (at `DATABASE_URL`, default the local `test` database),
//! dropped when it goes out of scope, so tests run in parallel without seeing each other.

use std::time::Duration;

use imagegate::ledger::PgSettings;

/// `DATABASE_URL`, or the local service's `test` database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema, dropped on drop.
pub struct Schema {
    pub name: String,
    url: String,
}

impl Schema {
    /// A schema at [`database_url`].
    pub fn new() -> Schema {
        Schema::at(&database_url())
    }

    /// A schema at `url` (a server a test started itself).
    pub fn at(url: &str) -> Schema {
        let name = format!("imagegate_test_{}", uuid::Uuid::new_v4().simple());
        let mut c = postgres::Client::connect(url, postgres::NoTls).expect("PostgreSQL");
        c.batch_execute(&format!("CREATE SCHEMA {name}")).unwrap();
        Schema {
            name,
            url: url.to_owned(),
        }
    }

    /// Settings for the schema with a pool of 4.
    pub fn settings(&self) -> PgSettings {
        self.settings_pooled(4)
    }

    pub fn settings_pooled(&self, pool_size: usize) -> PgSettings {
        PgSettings {
            url: self.url.clone(),
            schema: Some(self.name.clone()),
            pool_size,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// A client whose search path is the schema.
    pub fn client(&self) -> postgres::Client {
        self.settings().connect().unwrap()
    }

    /// The single integer `sql` answers.
    pub fn count(&self, sql: &str) -> i64 {
        self.client().query_one(sql, &[]).unwrap().get(0)
    }
}

impl Drop for Schema {
    /// On a plain thread: the synchronous client must not run on a runtime's worker.
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = postgres::Client::connect(&url, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA {name} CASCADE"));
            }
        })
        .join();
    }
}
