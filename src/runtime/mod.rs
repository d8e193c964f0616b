//! ONNX Runtime: library discovery and the process environment, session building with execution
//! providers, and running one batch. The only module that touches `ort`.
mod assemble;
mod convert;
mod executor;
mod library;
mod selection;
mod session;
mod strings;
mod threads;

pub use executor::OrtExecutor;
pub use library::{init_onnxruntime, LibraryLocation};
pub use session::{graph_signature, load_session, OptimizationLevel, ProviderPlan, SessionPlan};
pub use threads::cpu_budget;

/// Failures of the runtime layer. Messages say what to do where possible.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Library(String),
    #[error("{0}")]
    Session(String),
    #[error("{0}")]
    Provider(String),
    #[error("{0}")]
    Run(String),
}
