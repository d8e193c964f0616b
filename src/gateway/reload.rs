//! Re-reading the files an operator rotates under a running server (the policy, the token, each
//! door's TLS certificate, key and client CA): on SIGHUP, and when a look every
//! `--reload-poll-secs` finds one of them changed, which is how a Kubernetes Secret update reaches
//! a pod with no signal sent. The look is a `stat` per file, a few microseconds on the reactor.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::security::AccessControl;
use crate::server::tls_files::ReloadingTls;

/// What a reload reads again.
pub struct Reloads {
    /// None when the access control has no file to read again.
    access: Option<Arc<AccessControl>>,
    tls: Vec<Arc<ReloadingTls>>,
}

impl Reloads {
    pub fn new(access: &Arc<AccessControl>, tls: Vec<Arc<ReloadingTls>>) -> Self {
        let access = access.reloads().then(|| Arc::clone(access));
        Self { access, tls }
    }

    fn files(&self) -> Vec<PathBuf> {
        let access = self.access.iter().flat_map(|a| a.reloaded_files());
        let tls = self.tls.iter().flat_map(|t| t.files());
        access.chain(tls).map(Path::to_path_buf).collect()
    }

    /// Reads everything again; each part logs (and the policy audits) its own outcome.
    fn reload(&self, trigger: &'static str) {
        if let Some(access) = &self.access {
            let _ = access.reload(trigger);
        }
        for door in &self.tls {
            door.reload_logged();
        }
    }

    /// Reloads on SIGHUP, and after a look every `poll_secs` (0: never) finds a file changed.
    /// With nothing to reload, nothing starts and SIGHUP keeps its default meaning.
    pub fn start(self, poll_secs: u64) -> anyhow::Result<()> {
        let files = self.files();
        if files.is_empty() {
            return Ok(());
        }
        let mut hangup =
            signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
        let poll = (poll_secs > 0).then(|| Duration::from_secs(poll_secs));
        tokio::spawn(async move {
            let mut seen = Fingerprint::of(&files);
            loop {
                let signalled = tokio::select! {
                    signal = hangup.recv() => match signal {
                        Some(()) => true,
                        None => return,
                    },
                    _ = sleep_or_never(poll) => false,
                };
                // Taken before the reload reads, so a change made during it is seen next time.
                let now = Fingerprint::of(&files);
                let changed = now != seen;
                seen = now;
                let trigger = match (signalled, changed) {
                    (true, _) => "SIGHUP",
                    (false, true) => {
                        tracing::info!(
                            "a certificate, key, policy or token file changed: reloading"
                        );
                        "file_change"
                    }
                    (false, false) => continue,
                };
                self.reload(trigger);
            }
        });
        Ok(())
    }
}

async fn sleep_or_never(every: Option<Duration>) {
    match every {
        Some(every) => tokio::time::sleep(every).await,
        None => std::future::pending().await,
    }
}

/// What tells a file's content changed without reading it: the file behind any symbolic links
/// (the kubelet swaps a Secret's files by relinking, so the inode changes), its size and mtime.
/// A file that cannot be read has no identity, so its appearing or going away is a change too.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint(Vec<Option<FileIdentity>>);

#[derive(Debug, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
    size: u64,
    modified: (i64, i64),
}

impl Fingerprint {
    fn of(files: &[PathBuf]) -> Self {
        let identity = |path: &PathBuf| {
            let meta = std::fs::metadata(path).ok()?;
            Some(FileIdentity {
                device: meta.dev(),
                inode: meta.ino(),
                size: meta.size(),
                modified: (meta.mtime(), meta.mtime_nsec()),
            })
        };
        Self(files.iter().map(identity).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_changes_with_content_relinking_and_removal_but_not_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second, link) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("tls.crt"),
        );
        std::fs::write(&first, "one").unwrap();
        std::fs::write(&second, "one").unwrap();
        std::os::unix::fs::symlink(&first, &link).unwrap();
        let files = vec![link.clone()];
        let start = Fingerprint::of(&files);
        assert_eq!(start, Fingerprint::of(&files));

        // A Secret update: the link now names another file, of the same size and maybe mtime.
        let relinked = dir.path().join("tls.crt.next");
        std::os::unix::fs::symlink(&second, &relinked).unwrap();
        std::fs::rename(&relinked, &link).unwrap();
        let after_relink = Fingerprint::of(&files);
        assert_ne!(start, after_relink);

        std::fs::write(&second, "longer").unwrap();
        let after_write = Fingerprint::of(&files);
        assert_ne!(after_relink, after_write);

        std::fs::remove_file(&second).unwrap();
        assert_eq!(Fingerprint::of(&files), Fingerprint(vec![None]));
    }
}
