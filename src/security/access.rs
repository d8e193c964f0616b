//! The one authorization check every front door calls: token → principal, then whether that
//! principal may do what the call asks. Protocol-neutral: the gRPC adapter lives in
//! server/auth.rs, an HTTP door calls the same two methods.
//!
//! Rights are checked before any model lookup, so a refused caller gets the same answer whether the
//! model exists or not.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;

use super::audit::{AuditEvent, AuditLog};
use super::policy::{Access, Credential, Policy, Principal};

/// The principal name of the `--auth-token-file` token.
pub const TOKEN_FILE_PRINCIPAL: &str = "auth-token-file";
/// The principal every caller is when no authentication is configured.
pub const ANONYMOUS_PRINCIPAL: &str = "anonymous";

/// Where a call comes from and what it is, for the audit log.
#[derive(Debug, Clone, Copy)]
pub struct CallContext<'a> {
    /// `inference.GRPCInferenceService/ModelInfer`, or an HTTP method and route.
    pub rpc: &'a str,
    /// The peer address, when the transport has one.
    pub peer: Option<&'a str>,
}

/// A refused call. Each front door maps these to its status (gRPC UNAUTHENTICATED /
/// PERMISSION_DENIED, HTTP 401 / 403).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    #[error("permission denied: token '{principal}' may not use model '{model}'")]
    ModelDenied { principal: String, model: String },
    #[error("permission denied: {rpc} needs an admin token, and token '{principal}' is not one")]
    AdminDenied { principal: String, rpc: String },
}

impl AuthError {
    fn outcome(&self) -> &'static str {
        match self {
            AuthError::Unauthenticated => "unauthenticated",
            _ => "permission_denied",
        }
    }
}

/// The current policy, how to reload it, and the audit log denials go to.
pub struct AccessControl {
    /// None: no authentication configured, every caller has every right.
    policy: Option<RwLock<Arc<Policy>>>,
    policy_file: Option<PathBuf>,
    /// The `--auth-token-file` token's rule, merged into every policy read.
    token_file: RwLock<Option<Policy>>,
    /// Where that token is read again on a reload (None: it is fixed).
    token_path: Option<PathBuf>,
    audit: Arc<AuditLog>,
}

impl AccessControl {
    /// No token, no policy: everyone may do everything (the default, as before authentication).
    pub fn open(audit: Arc<AuditLog>) -> Self {
        Self {
            policy: None,
            policy_file: None,
            token_file: RwLock::new(None),
            token_path: None,
            audit,
        }
    }

    /// From `--auth-token-file`'s token and/or `--auth-policy-file`; an unreadable or invalid
    /// policy file is an error (startup stops).
    pub fn configure(
        token: Option<&[u8]>,
        policy_file: Option<&Path>,
        audit: Arc<AuditLog>,
    ) -> Result<Self, String> {
        if token.is_none() && policy_file.is_none() {
            return Ok(Self::open(audit));
        }
        let token_file = token.map(|t| Policy::single_token(TOKEN_FILE_PRINCIPAL, t));
        let mut control = Self {
            policy: None,
            policy_file: policy_file.map(Path::to_path_buf),
            token_file: RwLock::new(token_file),
            token_path: None,
            audit,
        };
        let policy = control.read_policy()?;
        control.policy = Some(RwLock::new(Arc::new(policy)));
        Ok(control)
    }

    pub fn is_enabled(&self) -> bool {
        self.policy.is_some()
    }

    /// Reads the `--auth-token-file` token again from `path` on each reload.
    pub fn reloading_token_from(mut self, path: PathBuf) -> Self {
        self.token_path = Some(path);
        self
    }

    /// Whether a reload has anything to read again.
    pub fn reloads(&self) -> bool {
        self.policy.is_some() && (self.policy_file.is_some() || self.token_path.is_some())
    }

    /// The files a reload reads again (none when it has nothing to read).
    pub fn reloaded_files(&self) -> Vec<&Path> {
        match self.reloads() {
            true => self
                .policy_file
                .iter()
                .chain(&self.token_path)
                .map(PathBuf::as_path)
                .collect(),
            false => Vec::new(),
        }
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The caller behind an `authorization` header value (`Bearer <token>`). A refusal is audited.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        call: &CallContext<'_>,
    ) -> Result<Principal, AuthError> {
        let credential = authorization.and_then(Credential::from_authorization);
        self.principal_of(credential.as_ref(), call)
    }

    /// The principal a credential stands for under the policy in force now (a stream asks again per
    /// message, so a reload that revokes a token also stops its open streams). A refusal is audited.
    pub fn principal_of(
        &self,
        credential: Option<&Credential>,
        call: &CallContext<'_>,
    ) -> Result<Principal, AuthError> {
        let Some(policy) = &self.policy else {
            return Ok(Principal::all_rights(ANONYMOUS_PRINCIPAL));
        };
        let policy = Arc::clone(&policy.read());
        match credential.and_then(|c| policy.principal_for_credential(c)) {
            Some(principal) => Ok(principal.clone()),
            None => Err(self.deny(None, AuthError::Unauthenticated, call, None)),
        }
    }

    /// Whether `principal` may do `access`. A refusal is audited.
    pub fn authorize(
        &self,
        principal: &Principal,
        access: Access<'_>,
        call: &CallContext<'_>,
    ) -> Result<(), AuthError> {
        let refusal = match access {
            Access::Server => None,
            Access::Model(model) if principal.may_use_model(model) => None,
            Access::Model(model) => Some(AuthError::ModelDenied {
                principal: principal.name.to_string(),
                model: model.to_string(),
            }),
            Access::Admin if principal.admin => None,
            Access::Admin => Some(AuthError::AdminDenied {
                principal: principal.name.to_string(),
                rpc: call.rpc.to_string(),
            }),
        };
        match refusal {
            None => Ok(()),
            Some(error) => {
                let model = match access {
                    Access::Model(m) => Some(m),
                    _ => None,
                };
                Err(self.deny(Some(principal), error, call, model))
            }
        }
    }

    fn deny(
        &self,
        principal: Option<&Principal>,
        error: AuthError,
        call: &CallContext<'_>,
        model: Option<&str>,
    ) -> AuthError {
        let mut event = AuditEvent::new("denied", call.rpc, error.outcome())
            .caller(principal.map(|p| &*p.name), call.peer)
            .reason(error.to_string());
        event.model = model.map(str::to_string);
        self.audit.record(event);
        tracing::debug!(rpc = call.rpc, peer = call.peer, %error, "call refused");
        error
    }

    /// Re-reads `--auth-policy-file` and the `--auth-token-file` token, on SIGHUP or once one of
    /// them changed (`trigger`, audited as the event's `rpc`). A file that cannot be read or
    /// parsed leaves the last good policy and token in force; either way the outcome is logged and
    /// audited. Returns the number of tokens now in force.
    pub fn reload(&self, trigger: &'static str) -> Result<usize, String> {
        let Some(current) = self.policy.as_ref().filter(|_| self.reloads()) else {
            return Err("no --auth-policy-file or --auth-token-file to reload".into());
        };
        let result = self.current_token_rule().and_then(|token| {
            let policy = self.read_policy_with(token.as_ref())?;
            Ok((token, policy))
        });
        let mut event = AuditEvent::new("policy_reload", trigger, "ok");
        let result = match result {
            Ok((token, policy)) => {
                tracing::info!(tokens = policy.len(), "authorization policy reloaded");
                *self.token_file.write() = token;
                let tokens = policy.len();
                *current.write() = Arc::new(policy);
                Ok(tokens)
            }
            Err(reason) => {
                tracing::warn!(%reason, "authorization policy not reloaded: keeping the last good one");
                event.outcome = "failed";
                event.reason = Some(reason.clone());
                Err(reason)
            }
        };
        self.audit.record(event);
        result
    }

    /// The token's rule as the token file holds it now; the one in force when it is not reread.
    fn current_token_rule(&self) -> Result<Option<Policy>, String> {
        match &self.token_path {
            None => Ok(self.token_file.read().clone()),
            Some(path) => {
                let token = super::setup::read_token_file(path).map_err(|e| format!("{e:#}"))?;
                Ok(Some(Policy::single_token(
                    TOKEN_FILE_PRINCIPAL,
                    token.as_bytes(),
                )))
            }
        }
    }

    fn read_policy(&self) -> Result<Policy, String> {
        self.read_policy_with(self.token_file.read().as_ref())
    }

    /// The policy file's rules merged with `token`'s.
    fn read_policy_with(&self, token: Option<&Policy>) -> Result<Policy, String> {
        let from_file = match &self.policy_file {
            None => Policy::parse(r#"{"tokens": []}"#).map_err(|e| e.to_string())?,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!("cannot read --auth-policy-file {}: {e}", path.display())
                })?;
                Policy::parse(&text)
                    .map_err(|e| format!("--auth-policy-file {}: {e}", path.display()))?
            }
        };
        Ok(match token {
            Some(token) => from_file.merged_with(token.clone()),
            None => from_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    const CALL: CallContext<'static> = CallContext {
        rpc: "inference.GRPCInferenceService/ModelInfer",
        peer: Some("127.0.0.1:1"),
    };

    fn hash(token: &str) -> String {
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn write_policy(path: &Path, tokens: &[(&str, &str, &[&str], bool)]) {
        let entries: Vec<serde_json::Value> = tokens
            .iter()
            .map(|(name, token, models, admin)| {
                serde_json::json!({"name": name, "sha256": hash(token), "models": models, "admin": admin})
            })
            .collect();
        std::fs::write(path, serde_json::json!({ "tokens": entries }).to_string()).unwrap();
    }

    #[test]
    fn open_access_lets_everyone_do_everything() {
        let control = AccessControl::open(Arc::new(AuditLog::disabled()));
        let who = control.authenticate(None, &CALL).unwrap();
        assert!(control.authorize(&who, Access::Admin, &CALL).is_ok());
        assert!(control.authorize(&who, Access::Model("m"), &CALL).is_ok());
    }

    #[test]
    fn rights_denials_audit_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (policy, audit_path) = (dir.path().join("policy.json"), dir.path().join("audit"));
        write_policy(&policy, &[("team-a", "tok-a", &["add_sub"], false)]);
        let audit = Arc::new(AuditLog::open(&audit_path, 0).unwrap());
        let control = AccessControl::configure(Some(b"legacy"), Some(&policy), audit).unwrap();
        let bearer = |t: &str| format!("Bearer {t}").into_bytes();

        assert_eq!(
            control.authenticate(None, &CALL),
            Err(AuthError::Unauthenticated)
        );
        assert_eq!(
            control.authenticate(Some(&bearer("nope")), &CALL),
            Err(AuthError::Unauthenticated)
        );
        let a = control.authenticate(Some(&bearer("tok-a")), &CALL).unwrap();
        assert!(control
            .authorize(&a, Access::Model("add_sub"), &CALL)
            .is_ok());
        let denied = control
            .authorize(&a, Access::Model("secret"), &CALL)
            .unwrap_err();
        // The same answer for a model that does not exist: no lookup happens here at all.
        let missing = control
            .authorize(&a, Access::Model("no_such_model"), &CALL)
            .unwrap_err();
        assert_eq!(
            denied.to_string().replace("secret", "X"),
            missing.to_string().replace("no_such_model", "X")
        );
        assert!(control.authorize(&a, Access::Admin, &CALL).is_err());
        let legacy = control
            .authenticate(Some(&bearer("legacy")), &CALL)
            .unwrap();
        assert!(control.authorize(&legacy, Access::Admin, &CALL).is_ok());

        // A broken file keeps the last good policy; a good one replaces it.
        std::fs::write(&policy, "{ not json").unwrap();
        assert!(control.reload("SIGHUP").is_err());
        assert!(control.authenticate(Some(&bearer("tok-a")), &CALL).is_ok());
        write_policy(&policy, &[("team-b", "tok-b", &["*"], true)]);
        assert_eq!(control.reload("SIGHUP"), Ok(2));
        assert!(control.authenticate(Some(&bearer("tok-a")), &CALL).is_err());
        let b = control.authenticate(Some(&bearer("tok-b")), &CALL).unwrap();
        assert!(control.authorize(&b, Access::Admin, &CALL).is_ok());
        assert!(control.authenticate(Some(&bearer("legacy")), &CALL).is_ok());

        let audit = std::fs::read_to_string(&audit_path).unwrap();
        let events: Vec<serde_json::Value> = audit
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let outcomes: Vec<&str> = events
            .iter()
            .map(|e| e["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(
            outcomes,
            [
                "unauthenticated",
                "unauthenticated",
                "permission_denied",
                "permission_denied",
                "permission_denied",
                "failed",
                "ok",
                "unauthenticated"
            ]
        );
        assert_eq!(events[2]["model"], "secret");
        assert_eq!(events[2]["token"], "team-a");
        for secret in ["tok-a", "tok-b", "legacy", "nope"] {
            assert!(!audit.contains(secret), "{secret} in the audit log");
        }
    }

    #[test]
    fn a_reload_rereads_the_token_file_and_keeps_it_when_the_file_is_bad() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let token = super::super::setup::read_token_file(&path).unwrap();
        let control =
            AccessControl::configure(Some(token.as_bytes()), None, Arc::new(AuditLog::disabled()))
                .unwrap()
                .reloading_token_from(path.clone());
        assert!(control.reloads());
        let works = |t: &str| {
            control
                .authenticate(Some(format!("Bearer {t}").as_bytes()), &CALL)
                .is_ok()
        };
        assert!(works("first"));
        std::fs::write(&path, "second").unwrap();
        assert_eq!(control.reload("SIGHUP"), Ok(1));
        assert!(works("second") && !works("first"));
        std::fs::write(&path, " \n").unwrap();
        let error = control.reload("SIGHUP").unwrap_err();
        assert!(error.contains("is empty"), "{error}");
        assert!(works("second"), "a bad file keeps the token in force");
        std::fs::remove_file(&path).unwrap();
        assert!(control
            .reload("SIGHUP")
            .unwrap_err()
            .contains("cannot read"));
        assert!(works("second"));
        // A token given without a file is fixed: nothing to reload.
        let fixed =
            AccessControl::configure(Some(b"t"), None, Arc::new(AuditLog::disabled())).unwrap();
        assert!(!fixed.reloads());
        assert!(fixed.reload("SIGHUP").is_err());
    }
}
