//! Protecting models and access to them: encrypted model files and their keys, the per-model
//! authorization policy, and the audit log. No protocol here: the front doors (server/) call
//! [`AccessControl`] and map its [`AuthError`] to their own statuses.
pub mod access;
pub mod audit;
pub mod encrypt_command;
pub mod model_crypto;
pub mod policy;
pub mod setup;

pub use access::{AccessControl, AuthError, CallContext};
pub use audit::{AuditEvent, AuditLog};
pub use model_crypto::{KeyRing, PlaintextModel};
pub use policy::{Access, Credential, Principal};
