//! `imagegate serve` as its own process, for the suites that need the real binary (a SIGKILL,
//! a restart, a signal, several replicas, the start-up log): started with JSON logs on stderr,
//! its address read from the `imagegate listening` line, every log line kept, killed (SIGKILL)
//! on drop if still running.
//!
//! Waits are bounded and never poll: a reader thread appends each line and wakes the waiters.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long [`Served::start`] waits for the listening line.
pub const START_WITHIN: Duration = Duration::from_secs(60);

/// The log of one process: its stderr lines, and whether it has ended.
#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    grew: Condvar,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    ended: bool,
}

/// A log line as a JSON event; a line that is not JSON becomes `{"message": line}`.
fn event(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|_| serde_json::json!({ "message": line }))
}

/// An `imagegate serve` process.
pub struct Served {
    child: Child,
    /// The API listener, once [`Served::listening`] has read it (`127.0.0.1:1` before).
    pub addr: SocketAddr,
    log: Arc<Log>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Served {
    /// Start `imagegate serve --config <config>` with `upstream_key` as `OPENAI_API_KEY` and
    /// none of the other `IMAGEGATE_*` overrides nor `RUST_LOG` of the test's environment; do
    /// not wait for it.
    pub fn spawn(config: &Path, upstream_key: &str) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_imagegate"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("OPENAI_API_KEY", upstream_key)
            .env_remove("IMAGEGATE_CONFIG")
            .env_remove("IMAGEGATE_UPSTREAM_URL")
            .env_remove("IMAGEGATE_REDIS_URL")
            .env_remove("IMAGEGATE_POSTGRES_URL")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the gateway binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Log::default());
        let writer = log.clone();
        // Reads every line until the process ends (keeps the pipe drained).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                writer.state.lock().unwrap().lines.push(line);
                writer.grew.notify_all();
            }
            writer.state.lock().unwrap().ended = true;
            writer.grew.notify_all();
        });
        Served {
            child,
            addr: "127.0.0.1:1".parse().unwrap(),
            log,
        }
    }

    /// [`Served::spawn`], then wait (at most [`START_WITHIN`]) for the listening line.
    pub async fn start(config: &Path, upstream_key: &str) -> Served {
        let mut served = Served::spawn(config, upstream_key);
        served.listening(START_WITHIN).await;
        served
    }

    /// Wait (at most `within`) for the `imagegate listening` line; read and return the address.
    pub async fn listening(&mut self, within: Duration) -> SocketAddr {
        self.addr = self.listener("imagegate listening", within).await;
        self.addr
    }

    /// The address logged by the first event with this message (`imagegate listening`,
    /// `admin listener`), waiting at most `within` for it.
    pub async fn listener(&self, message: &str, within: Duration) -> SocketAddr {
        let e = self.wait_for(message, within).await;
        e["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{message:?} has no socket address: {e}"))
    }

    /// The first log event with this message, waiting at most `within` for it; panics with the
    /// log when none comes (or the process ends first).
    pub async fn wait_for(&self, message: &str, within: Duration) -> serde_json::Value {
        let log = self.log.clone();
        let wanted = message.to_owned();
        let found = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + within;
            let mut state = log.state.lock().unwrap();
            let mut checked = 0;
            loop {
                for line in &state.lines[checked..] {
                    let e = event(line);
                    if e["message"] == wanted.as_str() {
                        return Some(e);
                    }
                }
                checked = state.lines.len();
                let left = deadline.saturating_duration_since(Instant::now());
                if state.ended || left.is_zero() {
                    return None;
                }
                state = log.grew.wait_timeout(state, left).unwrap().0;
            }
        })
        .await
        .unwrap();
        found.unwrap_or_else(|| {
            panic!(
                "no {message:?} log line within {within:?}:\n{}",
                self.log_text()
            )
        })
    }

    /// Every log line so far, one per line.
    pub fn log_text(&self) -> String {
        self.log.state.lock().unwrap().lines.join("\n")
    }

    /// Every log line so far as an event.
    pub fn log_events(&self) -> Vec<serde_json::Value> {
        let state = self.log.state.lock().unwrap();
        state.lines.iter().map(|l| event(l)).collect()
    }

    /// The JSON log events so far whose message is `message`.
    pub fn events(&self, message: &str) -> Vec<serde_json::Value> {
        self.log
            .state
            .lock()
            .unwrap()
            .iter_json()
            .filter(|e| e["message"] == message)
            .collect()
    }

    /// The process id (for signals and `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap the process.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("the killed gateway is reaped");
    }

    /// Send `signal` (`-HUP`, `-TERM`, ...) with `kill`.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let sent = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// SIGTERM, then wait (at most 30 s) for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not stop within 30 s of SIGTERM:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/metrics` from the admin listener `admin` with the admin key (within 30 s).
    pub async fn metrics(&self, admin: SocketAddr, admin_key: &str) -> String {
        let auth = format!("Bearer {admin_key}");
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            super::send(
                admin,
                "GET",
                "/metrics",
                &[("authorization", &auth)],
                Vec::new(),
            ),
        )
        .await
        .expect("GET /metrics answers within 30 s");
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    }

    /// A field (`VmHWM:`, `VmRSS:`) of the process's `/proc/<pid>/status`, in KiB.
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }
}

impl LogState {
    /// The lines that are JSON events.
    fn iter_json(&self) -> impl Iterator<Item = serde_json::Value> + '_ {
        self.lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    }
}

/// The value of one series (`name` or `name{labels}` exactly as rendered) in Prometheus text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
