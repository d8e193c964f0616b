//! The authorization policy: which token (known only by its SHA-256) may use which models, and
//! which may administer the server. Parsed from `--auth-policy-file` JSON:
//! `{"tokens": [{"name": "team-a", "sha256": "<hex>", "models": ["add_sub"], "admin": false}]}`.
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The models a principal may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelScope {
    All,
    Only(BTreeSet<String>),
}

impl ModelScope {
    pub fn allows(&self, model: &str) -> bool {
        match self {
            ModelScope::All => true,
            ModelScope::Only(models) => models.contains(model),
        }
    }
}

/// Who is calling, as resolved from the token: a name for logs and audit, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: Arc<str>,
    pub models: ModelScope,
    pub admin: bool,
}

impl Principal {
    /// Every right: the single `--auth-token-file` token, or everyone when no authentication is on.
    pub fn all_rights(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            models: ModelScope::All,
            admin: true,
        }
    }

    pub fn may_use_model(&self, model: &str) -> bool {
        self.models.allows(model)
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// Server-wide reads (liveness, readiness, metadata, the filtered index): any known token.
    Server,
    /// Inference, metadata, config, readiness or statistics of this model.
    Model(&'a str),
    /// Repository load/unload, shared-memory registration, log and trace settings.
    Admin,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    tokens: Vec<TokenRuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRuleFile {
    name: String,
    sha256: String,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    admin: bool,
}

#[derive(Clone)]
struct TokenRule {
    hash: [u8; 32],
    principal: Principal,
}

/// A parsed policy. Lookups hash the presented token and compare it with every rule in constant
/// time, so neither the token nor the rule that matched shows in response timings.
#[derive(Clone)]
pub struct Policy {
    rules: Vec<TokenRule>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.rules.iter().map(|r| &*r.principal.name).collect();
        f.debug_struct("Policy").field("tokens", &names).finish()
    }
}

/// Why a policy file was refused; names the entry at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("not a valid policy: {0}")]
    Json(String),
    #[error("token #{0}: the name must not be empty")]
    EmptyName(usize),
    #[error(
        "token '{0}': sha256 must be 64 hex characters (the SHA-256 of the token, not the token)"
    )]
    BadHash(String),
    #[error("token '{0}' is listed twice")]
    DuplicateName(String),
    #[error("tokens '{0}' and '{1}' have the same sha256")]
    DuplicateHash(String, String),
}

impl Policy {
    pub fn parse(json: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile =
            serde_json::from_str(json).map_err(|e| PolicyError::Json(e.to_string()))?;
        let mut rules: Vec<TokenRule> = Vec::with_capacity(file.tokens.len());
        let mut names = HashSet::new();
        for (index, entry) in file.tokens.into_iter().enumerate() {
            if entry.name.trim().is_empty() {
                return Err(PolicyError::EmptyName(index));
            }
            let hash = parse_hash(&entry.sha256).ok_or(PolicyError::BadHash(entry.name.clone()))?;
            if !names.insert(entry.name.clone()) {
                return Err(PolicyError::DuplicateName(entry.name));
            }
            if let Some(other) = rules.iter().find(|r| r.hash == hash) {
                return Err(PolicyError::DuplicateHash(
                    other.principal.name.to_string(),
                    entry.name,
                ));
            }
            let models = if entry.models.iter().any(|m| m == "*") {
                ModelScope::All
            } else {
                ModelScope::Only(entry.models.into_iter().collect())
            };
            rules.push(TokenRule {
                hash,
                principal: Principal {
                    name: Arc::from(entry.name),
                    models,
                    admin: entry.admin,
                },
            });
        }
        Ok(Self { rules })
    }

    /// A policy of one token with every right (`--auth-token-file`).
    pub fn single_token(name: &str, token: &[u8]) -> Self {
        Self {
            rules: vec![TokenRule {
                hash: sha256(token),
                principal: Principal::all_rights(name),
            }],
        }
    }

    /// This policy with `other`'s rules added (the `--auth-token-file` token beside the file's).
    pub fn merged_with(mut self, other: Policy) -> Self {
        self.rules.extend(other.rules);
        self
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The principal holding `token`, if any.
    pub fn principal_for(&self, token: &[u8]) -> Option<&Principal> {
        self.principal_for_credential(&Credential::of(token))
    }

    /// The principal whose token hashes to `credential`, if any.
    pub fn principal_for_credential(&self, credential: &Credential) -> Option<&Principal> {
        let mut found = None;
        // No early exit: every rule is compared, whatever matched.
        for rule in &self.rules {
            if bool::from(rule.hash.ct_eq(&credential.0)) {
                found = Some(&rule.principal);
            }
        }
        found
    }
}

/// A presented token, kept only as its SHA-256, so a long-lived call (a stream) can be checked again
/// against a reloaded policy without holding the token itself. Debug shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential([u8; 32]);

impl Credential {
    pub fn of(token: &[u8]) -> Self {
        Self(sha256(token))
    }

    /// The credential of an `authorization` header value (`Bearer <token>`), if it holds one.
    pub fn from_authorization(header_value: &[u8]) -> Option<Self> {
        bearer_token(header_value).map(Self::of)
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let text = text.trim().as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// The token of an HTTP/gRPC `authorization` header value: `Bearer <token>` (scheme in any case).
pub fn bearer_token(header_value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header_value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn policy_json() -> String {
        format!(
            r#"{{"tokens": [
                {{"name": "team-a", "sha256": "{}", "models": ["add_sub"]}},
                {{"name": "ops", "sha256": "{}", "models": ["*"], "admin": true}}
            ]}}"#,
            hex(&sha256(b"token-a")),
            hex(&sha256(b"token-ops")).to_uppercase()
        )
    }

    #[test]
    fn tokens_resolve_to_their_principal() {
        let policy = Policy::parse(&policy_json()).unwrap();
        assert_eq!(policy.len(), 2);
        let a = policy.principal_for(b"token-a").unwrap();
        assert_eq!(&*a.name, "team-a");
        assert!(a.may_use_model("add_sub"));
        assert!(!a.may_use_model("digits_classifier"));
        assert!(!a.admin);
        let ops = policy.principal_for(b"token-ops").unwrap();
        assert!(ops.admin && ops.may_use_model("anything"));
        assert!(policy.principal_for(b"token-b").is_none());
        assert!(policy.principal_for(b"").is_none());
        assert!(!format!("{policy:?}").contains(&hex(&sha256(b"token-a"))));
        let credential = Credential::of(b"token-a");
        assert_eq!(policy.principal_for_credential(&credential), Some(a));
        assert_eq!(format!("{credential:?}"), "Credential(..)");
        assert_eq!(
            Credential::from_authorization(b"Bearer token-a"),
            Some(credential)
        );
    }

    #[test]
    fn the_token_file_token_merges_in() {
        let policy = Policy::parse(&policy_json())
            .unwrap()
            .merged_with(Policy::single_token("auth-token-file", b"legacy"));
        let legacy = policy.principal_for(b"legacy").unwrap();
        assert_eq!(*legacy, Principal::all_rights("auth-token-file"));
    }

    #[test]
    fn bad_policies_say_what_is_wrong() {
        let err = |json: &str| Policy::parse(json).unwrap_err();
        assert!(matches!(err("{"), PolicyError::Json(_)));
        assert!(matches!(err(r#"{"token": []}"#), PolicyError::Json(_)));
        let h = hex(&sha256(b"x"));
        assert!(matches!(
            err(&format!(
                r#"{{"tokens":[{{"name":"a","sha256":"{h}","model":["m"]}}]}}"#
            )),
            PolicyError::Json(_)
        ));
        assert_eq!(
            err(r#"{"tokens":[{"name":"a","sha256":"secret-token"}]}"#),
            PolicyError::BadHash("a".into())
        );
        assert_eq!(
            err(&format!(r#"{{"tokens":[{{"name":" ","sha256":"{h}"}}]}}"#)),
            PolicyError::EmptyName(0)
        );
        let g = hex(&sha256(b"y"));
        assert_eq!(
            err(&format!(
                r#"{{"tokens":[{{"name":"a","sha256":"{h}"}},{{"name":"a","sha256":"{g}"}}]}}"#
            )),
            PolicyError::DuplicateName("a".into())
        );
        assert_eq!(
            err(&format!(
                r#"{{"tokens":[{{"name":"a","sha256":"{h}"}},{{"name":"b","sha256":"{h}"}}]}}"#
            )),
            PolicyError::DuplicateHash("a".into(), "b".into())
        );
        assert!(Policy::parse(r#"{"tokens":[]}"#).unwrap().is_empty());
    }

    #[test]
    fn bearer_header_values() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bear"), None);
    }
}
