//! The Redis side of the shared limiter: the GCRA script and how its answer is read.

use std::time::Duration;

use crate::limits::rate::LimitSpec;

/// GCRA over several keys in one atomic step.
///
/// KEYS[i]: one limit's key. ARGV[3i-2], ARGV[3i-1], ARGV[3i]: its interval `t` (µs), its burst
/// tolerance `tau` = t × burst (µs) and the cost in cells. Returns a flat array with one pair
/// per key: `0, tat - now` admitted (new TAT written, expiring after tau); `1, wait` refused
/// until `wait` µs from now; `2, 0` cost beyond the burst (never admitted); after a refusal the
/// later keys are only read: `3, tat - now` (may be negative) or `4, 0` (no key).
/// A missing key starts at `now + t`, governor's starting state.
pub const SCRIPT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local out = {}
local stopped = false
for i, key in ipairs(KEYS) do
  local t = tonumber(ARGV[3 * i - 2])
  local tau = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local stored = redis.call('GET', key)
  if stopped then
    if stored then
      out[#out + 1] = 3
      out[#out + 1] = tonumber(stored) - now
    else
      out[#out + 1] = 4
      out[#out + 1] = 0
    end
  elseif cost * t > tau then
    out[#out + 1] = 2
    out[#out + 1] = 0
    stopped = true
  else
    local tat = now + t
    if stored then tat = tonumber(stored) end
    local earliest = tat + (cost - 1) * t - tau
    if now < earliest then
      out[#out + 1] = 1
      out[#out + 1] = earliest - now
      stopped = true
    else
      local next = math.max(tat, now) + cost * t
      redis.call('SET', key, string.format('%d', next), 'PX', math.max(1, math.ceil(tau / 1000)))
      out[#out + 1] = 0
      out[#out + 1] = next - now
    end
  end
end
return out
"#;

/// What the script said about one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Admitted { tat_from_now: i64 },
    Refused { wait_us: i64 },
    BeyondBurst,
    Peeked { tat_from_now: i64 },
    Absent,
}

pub(super) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX).max(1)
}

/// governor's `remaining_burst_capacity` for a TAT `tat_from_now` µs ahead.
pub(super) fn remaining(spec: &LimitSpec, tat_from_now: i64) -> u32 {
    let t = micros(spec.interval());
    let tau = t * i64::from(spec.burst);
    let cells = (t + tau - tat_from_now).clamp(0, tau) / t;
    u32::try_from(cells).unwrap_or(u32::MAX)
}

pub(super) fn wait(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

pub(super) fn decode(pair: &[i64]) -> Outcome {
    match (pair[0], pair[1]) {
        (0, v) => Outcome::Admitted { tat_from_now: v },
        (1, v) => Outcome::Refused { wait_us: v },
        (2, _) => Outcome::BeyondBurst,
        (3, v) => Outcome::Peeked { tat_from_now: v },
        _ => Outcome::Absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_matches_governor() {
        // 6/min, burst 3: t = 10 s. A fresh key admitted once has its TAT 2t ahead.
        let spec = LimitSpec::new(Some(6), Some(3)).unwrap();
        assert_eq!(remaining(&spec, 20_000_000), 2);
        assert_eq!(remaining(&spec, 40_000_000), 0);
        assert_eq!(remaining(&spec, -5_000_000), 3, "never above the burst");
    }

    #[test]
    fn answers_decode_pair_by_pair() {
        assert_eq!(decode(&[0, 7]), Outcome::Admitted { tat_from_now: 7 });
        assert_eq!(decode(&[1, 9]), Outcome::Refused { wait_us: 9 });
        assert_eq!(decode(&[2, 0]), Outcome::BeyondBurst);
        assert_eq!(decode(&[3, -4]), Outcome::Peeked { tat_from_now: -4 });
        assert_eq!(decode(&[4, 0]), Outcome::Absent);
        assert_eq!(wait(-5), Duration::ZERO, "a negative wait is no wait");
    }
}
