//! Config fields this server reads without acting on them: each one present gets a warning at load,
//! so a migrated repository says what it lost instead of silently serving differently. (Fields that
//! would change what a request or response means are refused in `validate` instead.)
use super::ModelConfig;

/// The names of the set fields of `config` that have no effect here.
pub fn ignored_fields(config: &ModelConfig) -> Vec<&'static str> {
    let mut found = Vec::new();
    let mut note = |present: bool, field: &'static str| {
        if present {
            found.push(field);
        }
    };
    note(config.model_operations.is_some(), "model_operations");
    note(
        config.model_repository_agents.is_some(),
        "model_repository_agents",
    );
    note(config.model_metrics.is_some(), "model_metrics");
    if let Some(opt) = &config.optimization {
        note(opt.priority != 0, "optimization.priority");
        note(opt.cuda.is_some(), "optimization.cuda");
        note(
            opt.output_pinned_memory.is_some(),
            "optimization.output_pinned_memory",
        );
        note(opt.eager_batching, "optimization.eager_batching");
        note(
            opt.execution_accelerators
                .as_ref()
                .is_some_and(|a| !a.cpu_execution_accelerator.is_empty()),
            "optimization.execution_accelerators.cpu_execution_accelerator",
        );
    }
    note(
        config
            .instance_group
            .iter()
            .any(|g| g.rate_limiter.is_some()),
        "instance_group.rate_limiter",
    );
    note(
        config
            .instance_group
            .iter()
            .any(|g| !g.host_policy.is_empty()),
        "instance_group.host_policy",
    );
    if let Some(crate::proto::model_config::SchedulingChoice::EnsembleScheduling(e)) =
        &config.scheduling_choice
    {
        note(
            e.max_inflight_requests != 0,
            "ensemble_scheduling.max_inflight_requests",
        );
        note(
            e.step.iter().any(|s| !s.model_namespace.is_empty()),
            "ensemble_scheduling.step.model_namespace",
        );
    }
    found
}

/// Logs one warning naming every ignored field of `config`.
pub fn warn_ignored(model: &str, config: &ModelConfig) {
    let fields = ignored_fields(config);
    if !fields.is_empty() {
        tracing::warn!(model = %model, fields = %fields.join(", "), "config fields ignored by this server");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_ignored_field() {
        let mut c = ModelConfig::default();
        assert!(ignored_fields(&c).is_empty());
        c.model_metrics = Some(Default::default());
        c.output.push(crate::proto::ModelOutput {
            label_filename: "labels.txt".into(),
            ..Default::default()
        });
        // label_filename feeds the classification extension, so it is not ignored.
        assert_eq!(ignored_fields(&c), vec!["model_metrics"]);
    }
}
