//! `imagegate quota show`: use and remaining quota per period.

use rusqlite::params;

use super::{Backend, QuotaStore, client_scope, user_scope};
use crate::limits::EndUser;
use crate::limits::spec::micros_to_usd;

/// One line of `imagegate quota show`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuotaLine {
    pub scope: String,
    pub period: String,
    pub images_used: u64,
    pub images_limit: Option<u64>,
    pub images_remaining: Option<u64>,
    pub usd_used: String,
    pub usd_limit: Option<String>,
    pub usd_remaining: Option<String>,
}

impl QuotaStore {
    /// Every user scope of a client seen this month.
    pub fn users_of(&self, client: &str) -> Result<Vec<String>, String> {
        let (_, month) = Self::periods(&self.now());
        let pattern = format!(
            "user:{}\u{1f}%",
            client
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        if let Backend::Postgres(pool) = &*self.backend {
            return pool
                .with(|c| {
                    Ok(c.query(
                        "SELECT scope FROM quota_usage WHERE period = $1 AND scope LIKE $2 ESCAPE '\\' ORDER BY scope",
                        &[&month, &pattern],
                    )?
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect())
                })
                .map_err(|e| e.to_string());
        }
        let conn = self.sqlite().expect("sqlite backend");
        let mut stmt = conn
            .prepare("SELECT scope FROM quota_usage WHERE period = ?1 AND scope LIKE ?2 ESCAPE '\\' ORDER BY scope")
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map(params![month, pattern], |r| r.get::<_, String>(0))
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    }

    /// Use and remaining quota per period for the clients and users asked for.
    pub fn show(&self, client: Option<&str>, user: Option<&str>) -> Result<Vec<QuotaLine>, String> {
        let mut lines = Vec::new();
        for c in &self.config.clients {
            if client.is_some_and(|want| want != c.name) {
                continue;
            }
            let mut whos: Vec<EndUser> = Vec::new();
            if user.is_none() {
                whos.push(EndUser {
                    client: c.name.as_str().into(),
                    user: None,
                });
            }
            let mut users: Vec<String> = self
                .users_of(&c.name)?
                .into_iter()
                .filter_map(|s| s.split_once('\u{1f}').map(|(_, u)| u.to_owned()))
                .collect();
            if let Some(u) = user {
                users.retain(|x| x == u);
                if users.is_empty() {
                    users.push(u.to_owned());
                }
            }
            whos.extend(users.into_iter().map(|u| EndUser {
                client: c.name.as_str().into(),
                user: Some(u),
            }));
            for who in whos {
                let (client_limits, user_limits) = self.limits_for(&who);
                let (scope, limits, label) = match user_scope(&who) {
                    Some(s) => (s, user_limits, who.label()),
                    None => (
                        client_scope(&who.client),
                        client_limits,
                        format!("client '{}'", who.client),
                    ),
                };
                let u = self.usage(&scope)?;
                for (period, images, micros, img_limit, mic_limit) in [
                    (
                        &u.day,
                        u.images_day,
                        u.micros_day,
                        limits.images_day,
                        limits.micros_day,
                    ),
                    (
                        &u.month,
                        u.images_month,
                        u.micros_month,
                        limits.images_month,
                        limits.micros_month,
                    ),
                ] {
                    lines.push(QuotaLine {
                        scope: label.clone(),
                        period: period.clone(),
                        images_used: images,
                        images_limit: img_limit,
                        images_remaining: img_limit.map(|l| l.saturating_sub(images)),
                        usd_used: micros_to_usd(micros),
                        usd_limit: mic_limit.map(micros_to_usd),
                        usd_remaining: mic_limit.map(|l| micros_to_usd((l - micros).max(0))),
                    });
                }
            }
        }
        Ok(lines)
    }
}

/// Render `quota show` as an aligned table.
pub fn render_table(lines: &[QuotaLine]) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "unlimited".into());
    let mut rows = vec![[
        "SCOPE".to_string(),
        "PERIOD".into(),
        "IMAGES USED".into(),
        "IMAGES LIMIT".into(),
        "IMAGES LEFT".into(),
        "USD USED".into(),
        "USD LIMIT".into(),
        "USD LEFT".into(),
    ]];
    for l in lines {
        rows.push([
            l.scope.clone(),
            l.period.clone(),
            l.images_used.to_string(),
            opt(&l.images_limit.map(|v| v.to_string())),
            opt(&l.images_remaining.map(|v| v.to_string())),
            l.usd_used.clone(),
            opt(&l.usd_limit),
            opt(&l.usd_remaining),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
