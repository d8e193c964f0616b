//! Ensembles (`platform: "ensemble"` with `ensemble_scheduling`): DAGs of composing models. The
//! planner checks the config against the composing models at load; the executor runs each request's
//! steps as soon as their inputs exist, each through its composing model's own scheduler, so
//! concurrent ensemble requests batch at every step. Tensors pass between steps in-process, by
//! reference count, never re-encoded.
pub mod executor;
pub mod planner;
pub mod runner;

pub use executor::EnsembleExecutor;
pub use planner::{is_ensemble, plan, Plan, PlanError, ENSEMBLE_PLATFORM};
pub use runner::ModelRunner;
