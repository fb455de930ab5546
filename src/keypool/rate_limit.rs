//! Reading a 429 answer: how long it asks to wait, and whether it is a rate limit at all.

use std::time::Duration;

/// How long a 429 rate limit asks to wait: `retry-after-ms`, else `retry-after` (seconds),
/// else the longest `x-ratelimit-reset-<kind>` among the kinds whose `x-ratelimit-remaining-<kind>`
/// is 0 (all of them when none says 0). `None` when the answer names no time.
pub fn rate_limit_wait(headers: &http::HeaderMap) -> Option<Duration> {
    let text = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    if let Some(s) = text("retry-after").and_then(|v| v.parse::<f64>().ok())
        && s.is_finite()
        && s >= 0.0
    {
        return Some(Duration::from_secs_f64(s));
    }
    let mut exhausted = None::<Duration>;
    let mut any = None::<Duration>;
    for (name, value) in headers {
        let Some(kind) = name.as_str().strip_prefix("x-ratelimit-reset-") else {
            continue;
        };
        let Some(d) = value.to_str().ok().and_then(parse_go_duration) else {
            continue;
        };
        any = Some(any.map_or(d, |a| a.max(d)));
        if text(&format!("x-ratelimit-remaining-{kind}")) == Some("0") {
            exhausted = Some(exhausted.map_or(d, |a| a.max(d)));
        }
    }
    exhausted.or(any)
}

/// A duration as OpenAI's `x-ratelimit-reset-*` write it (Go's format): `6m0s`, `1.2s`, `20ms`,
/// `1h2m3.5s`; a bare number is seconds.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

/// Whether a 429 answer's body is a rate limit (anything but `insufficient_quota`, which no
/// wait cures and another key of the same organization would answer alike).
pub fn is_rate_limit_body(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return true;
    };
    let e = &v["error"];
    !(e["code"] == "insufficient_quota" || e["type"] == "insufficient_quota")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_from_headers() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            rate_limit_wait(&m)
        };
        assert_eq!(
            h(&[("retry-after-ms", "250"), ("retry-after", "9")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(h(&[("retry-after", "12")]), Some(Duration::from_secs(12)));
        assert_eq!(
            h(&[
                ("x-ratelimit-remaining-requests", "4"),
                ("x-ratelimit-reset-requests", "6m0s"),
                ("x-ratelimit-remaining-images", "0"),
                ("x-ratelimit-reset-images", "1.5s"),
            ]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            h(&[("x-ratelimit-reset-tokens", "20ms")]),
            Some(Duration::from_millis(20))
        );
        assert_eq!(h(&[("retry-after", "soon")]), None);
        assert_eq!(
            parse_go_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_go_duration("3x"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn insufficient_quota_is_not_a_rate_limit() {
        assert!(!is_rate_limit_body(
            br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#
        ));
        assert!(is_rate_limit_body(
            br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#
        ));
        assert!(is_rate_limit_body(b"not json"));
    }
}
