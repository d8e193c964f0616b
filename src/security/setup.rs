//! Startup wiring of the security room from its flags: the audit log, the access control, the model
//! keys, and the SIGHUP reload of the policy. gateway.rs calls these; no protocol here.
use std::sync::Arc;

use anyhow::Context;

use super::{AccessControl, AuditLog, KeyRing};
use crate::config::SecurityArgs;

/// The authorization policy (the `--auth-token-file` token and/or `--auth-policy-file`) with the
/// audit log it writes to.
pub fn access_control(
    args: &SecurityArgs,
    auth_token: Option<&[u8]>,
) -> anyhow::Result<Arc<AccessControl>> {
    let audit = match &args.audit_log {
        Some(path) => AuditLog::open(path, args.audit_log_max_bytes)
            .with_context(|| format!("cannot open --audit-log {}", path.display()))?,
        None => AuditLog::disabled(),
    };
    let access = AccessControl::configure(
        auth_token,
        args.auth_policy_file.as_deref(),
        Arc::new(audit),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(Arc::new(access))
}

/// The keys for encrypted model files; their ids (never the keys) are logged.
pub fn model_keys(args: &SecurityArgs) -> anyhow::Result<Arc<KeyRing>> {
    let keys = KeyRing::from_files(&args.model_key_files).map_err(anyhow::Error::msg)?;
    if !keys.is_empty() {
        let ids: Vec<String> = keys.ids().iter().map(|id| id.to_string()).collect();
        tracing::info!(key_ids = ?ids, "model decryption keys loaded");
    }
    Ok(Arc::new(keys))
}

/// With a policy file, SIGHUP re-reads it (a broken file keeps the last good policy). Without one,
/// SIGHUP keeps its default meaning.
pub fn reload_policy_on_sighup(access: &Arc<AccessControl>) -> anyhow::Result<()> {
    if !access.has_policy_file() {
        return Ok(());
    }
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let access = Arc::clone(access);
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let _ = access.reload();
        }
    });
    Ok(())
}
