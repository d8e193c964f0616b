//! The audit log (`--audit-log PATH`): one JSON object per line for every denied call, every model
//! load, unload and reload, every policy reload and shared-memory registration. A line holds the
//! time, the token's name (never the token), the peer, the RPC, the model and the outcome; never
//! tensor data.
//!
//! Bounded on disk (`--audit-log-max-bytes`): a line that would take the file past the bound first
//! moves it to `PATH.1` (replacing the one before) and starts a new file, so a flood of denied
//! calls holds at most twice the bound and the newest lines are always kept.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;

/// One audit record. Fields that do not apply are left out of the line.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct AuditEvent {
    /// What happened: `denied`, `model_load`, `model_unload`, `policy_reload`, `shm_register`,
    /// `shm_unregister`.
    pub event: &'static str,
    /// The principal's name (`auth-token-file`, a policy entry's name, `anonymous`); absent for a
    /// call with no known token, or for the server's own actions (startup, poll).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The RPC (`inference.GRPCInferenceService/ModelInfer`, an HTTP route), or `startup` / `poll`
    /// / `SIGHUP` for the server's own actions.
    pub rpc: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The shared-memory region a registration names (empty: every region).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `ok`, `failed`, `unauthenticated` or `permission_denied`.
    pub outcome: &'static str,
    /// Why, when not `ok`. Error texts never carry tensor contents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl AuditEvent {
    pub fn new(event: &'static str, rpc: impl Into<String>, outcome: &'static str) -> Self {
        Self {
            event,
            rpc: rpc.into(),
            outcome,
            ..Default::default()
        }
    }

    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn caller(mut self, token: Option<&str>, peer: Option<&str>) -> Self {
        self.token = token.map(str::to_string);
        self.peer = peer.map(str::to_string);
        self
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

/// Where audit lines go: an append-only file, or nowhere when `--audit-log` is unset.
pub struct AuditLog {
    file: Option<Mutex<AuditFile>>,
}

/// The open audit file and what it holds, against its bound.
struct AuditFile {
    file: File,
    path: PathBuf,
    written: u64,
    /// 0: no bound.
    max_bytes: u64,
}

/// Opens (creating, appending) `path`; owner-only permissions for a new file.
fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl AuditFile {
    /// Appends `line` whole, first moving a full file to `PATH.1`. If the move fails the line
    /// still goes to the current file (a lost audit line is worse than a late bound), and the next
    /// try waits for another bound's worth of lines.
    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        let len = line.len() as u64;
        if self.max_bytes > 0 && self.written > 0 && self.written + len > self.max_bytes {
            if let Err(e) = self.rotate() {
                tracing::warn!(error = %e, path = %self.path.display(), "cannot rotate the audit log");
            }
            self.written = 0;
        }
        // One write per line on an O_APPEND file: lines from concurrent calls never interleave.
        self.file.write_all(line)?;
        self.written += len;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut previous = self.path.clone().into_os_string();
        previous.push(".1");
        std::fs::rename(&self.path, &previous)?;
        self.file = open_append(&self.path)?;
        Ok(())
    }
}

impl AuditLog {
    pub fn disabled() -> Self {
        Self { file: None }
    }

    /// Opens (creating, appending) the audit file, bounded at `max_bytes` (0: unbounded);
    /// owner-only permissions for a new file.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = open_append(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            file: Some(Mutex::new(AuditFile {
                file,
                path: path.to_path_buf(),
                written,
                max_bytes,
            })),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.file.is_some()
    }

    /// Appends one line. A failed write is logged, never fails the call being audited.
    pub fn record(&self, event: AuditEvent) {
        let Some(file) = &self.file else { return };
        let line = Line {
            time: rfc3339_now(),
            event: &event,
        };
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode an audit record");
                return;
            }
        };
        bytes.push(b'\n');
        if let Err(e) = file.lock().append(&bytes) {
            tracing::warn!(error = %e, "cannot write to the audit log");
        }
    }
}

impl AuditLog {
    /// A load or unload the server did by itself (`rpc`: `startup`, `poll`), with its outcome.
    pub fn model_change<E: std::fmt::Display>(
        &self,
        event: &'static str,
        rpc: &str,
        model: &str,
        result: &Result<(), E>,
    ) {
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        let mut line = AuditEvent::new(event, rpc, outcome).model(model);
        line.reason = result.as_ref().err().map(|e| e.to_string());
        self.record(line);
    }
}

/// Now as `2026-12-01T10:15:47.123Z`.
fn rfc3339_now() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(since.as_secs() as i64, since.subsec_millis())
}

fn rfc3339(unix_secs: i64, millis: u32) -> String {
    let (days, secs) = (unix_secs.div_euclid(86_400), unix_secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_796_123_747, 123), "2026-12-01T11:15:47.123Z");
    }

    #[test]
    fn lines_are_json_with_only_the_fields_that_apply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, 0).unwrap();
        log.record(
            AuditEvent::new(
                "denied",
                "inference.GRPCInferenceService/ModelInfer",
                "permission_denied",
            )
            .caller(Some("team-a"), Some("127.0.0.1:5000"))
            .model("secret_model"),
        );
        log.record(AuditEvent::new("model_load", "startup", "ok").model("add_sub"));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["token"], "team-a");
        assert_eq!(lines[0]["peer"], "127.0.0.1:5000");
        assert_eq!(lines[0]["model"], "secret_model");
        assert_eq!(lines[0]["outcome"], "permission_denied");
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        assert!(lines[1].get("token").is_none());
        assert_eq!(lines[1]["event"], "model_load");
    }

    #[test]
    fn the_log_moves_to_dot_1_at_its_bound_and_keeps_every_line_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let previous = dir.path().join("audit.log.1");
        let denied = |i: usize| AuditEvent::new("denied", format!("rpc-{i:04}"), "unauthenticated");
        let line_len = {
            let probe = dir.path().join("probe");
            AuditLog::open(&probe, 0).unwrap().record(denied(0));
            std::fs::metadata(&probe).unwrap().len()
        };
        // Room for three lines and a half: the fourth line starts a new file.
        let bound = line_len * 7 / 2;
        let log = AuditLog::open(&path, bound).unwrap();
        for i in 0..10 {
            log.record(denied(i));
        }
        let rpcs = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["rpc"].to_string())
                .collect()
        };
        // 10 lines, three a file: the current file holds the last one, .1 the three before it.
        assert_eq!(rpcs(&path), ["\"rpc-0009\""]);
        assert_eq!(
            rpcs(&previous),
            ["\"rpc-0006\"", "\"rpc-0007\"", "\"rpc-0008\""]
        );
        for file in [&path, &previous] {
            assert!(std::fs::metadata(file).unwrap().len() <= bound);
        }
        // Reopened, the file's size counts: the next two lines fill it, the third moves it.
        drop(log);
        let log = AuditLog::open(&path, bound).unwrap();
        for i in 10..13 {
            log.record(denied(i));
        }
        assert_eq!(
            rpcs(&previous),
            ["\"rpc-0009\"", "\"rpc-0010\"", "\"rpc-0011\""]
        );
        assert_eq!(rpcs(&path), ["\"rpc-0012\""]);
        // Unbounded with 0.
        let unbounded = dir.path().join("all.log");
        let log = AuditLog::open(&unbounded, 0).unwrap();
        for i in 0..10 {
            log.record(denied(i));
        }
        assert_eq!(rpcs(&unbounded).len(), 10);
    }
}
