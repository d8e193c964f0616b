//! Startup wiring of the security room from its flags: the audit log, the access control and the model
//! keys. gateway.rs calls these, and wires the SIGHUP reload; no protocol here.
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use zeroize::Zeroizing;

use super::{AccessControl, AuditLog, KeyRing};
use crate::config::SecurityArgs;

/// The authorization policy (the `--auth-token-file` token and/or `--auth-policy-file`) with the
/// audit log it writes to; both files are read again on each reload.
pub fn access_control(
    args: &SecurityArgs,
    token_file: Option<&Path>,
) -> anyhow::Result<Arc<AccessControl>> {
    let audit = match &args.audit_log {
        Some(path) => AuditLog::open(path, args.audit_log_max_bytes)
            .with_context(|| format!("cannot open --audit-log {}", path.display()))?,
        None => AuditLog::disabled(),
    };
    let token = token_file.map(read_token_file).transpose()?;
    let access = AccessControl::configure(
        token.as_ref().map(|t| t.as_bytes()),
        args.auth_policy_file.as_deref(),
        Arc::new(audit),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(Arc::new(match token_file {
        Some(path) => access.reloading_token_from(path.to_path_buf()),
        None => access,
    }))
}

/// The `--auth-token-file` token, without surrounding whitespace; an empty file is an error. Wiped
/// from memory when dropped.
pub fn read_token_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --auth-token-file {}", path.display()))?,
    );
    let token = Zeroizing::new(text.trim().to_string());
    anyhow::ensure!(
        !token.is_empty(),
        "--auth-token-file {} is empty",
        path.display()
    );
    Ok(token)
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
