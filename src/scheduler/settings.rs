//! Scheduler settings derived from a model's config.pbtxt: batching, queue policies and instances.
use std::collections::BTreeMap;
use std::time::Duration;

use crate::proto::model_config::SchedulingChoice;
use crate::proto::model_queue_policy::TimeoutAction as ProtoTimeoutAction;
use crate::proto::{ModelConfig, ModelDynamicBatching, ModelQueuePolicy};

use super::policy::{BatchingStrategy, PolicyConfig, QueuePolicy, TimeoutAction};

/// Requests a model may hold queued when its config sets no `max_queue_size` (Triton's "no limit"):
/// the server-wide default, so memory stays bounded under any load.
pub const DEFAULT_MAX_QUEUE: usize = 10_000;

/// Where one model instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceKind {
    Cpu,
    /// A GPU, by device id.
    Gpu(i32),
}

/// One model instance to build: one ONNX Runtime session owned by one worker thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Triton's instance name: `<group name>_<index within the group>`.
    pub name: String,
    pub kind: InstanceKind,
}

/// How one model is scheduled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerSettings {
    pub model: String,
    /// The config's max_batch_size: 0 means the model has no batch dimension.
    pub max_batch_size: usize,
    /// Whether requests are combined into batches (max_batch_size > 0 and dynamic_batching set).
    pub dynamic_batching: bool,
    pub policy: PolicyConfig,
    /// Answer requests in the order they were dispatched, across instances.
    pub preserve_ordering: bool,
    /// Instances to build, in order; the executors passed to `Scheduler::start` follow it.
    pub instances: Vec<InstanceSpec>,
    /// Run a batch on the arriving request's own task, instead of waking an instance thread, while
    /// the model's recent batches took at most this long (`--inline-execution-max-microseconds`);
    /// None never does.
    pub inline_below: Option<std::time::Duration>,
    /// An inline batch of 8 or more requests answers its first half one reactor turn before the
    /// second while the model's recent batches took at least this long and its cost is mostly per
    /// row (`--split-answers-min-microseconds`, see `answer_split`); None never does.
    pub split_answers_from: Option<std::time::Duration>,
}

impl SchedulerSettings {
    /// Derives the settings from a validated, auto-completed config. `default_max_queue` bounds the
    /// requests a model holds when no level sets `max_queue_size` (see [`DEFAULT_MAX_QUEUE`]).
    pub fn from_config(
        config: &ModelConfig,
        default_max_queue: usize,
    ) -> Result<SchedulerSettings, String> {
        Self::from_config_with_strategy(config, default_max_queue, BatchingStrategy::Triton)
    }

    /// As [`Self::from_config`], with `default_strategy` (`--default-batching-strategy`) for a
    /// model whose config sets no `batching_strategy` parameter.
    pub fn from_config_with_strategy(
        config: &ModelConfig,
        default_max_queue: usize,
        default_strategy: BatchingStrategy,
    ) -> Result<SchedulerSettings, String> {
        let strategy =
            BatchingStrategy::from_parameters(&config.parameters)?.unwrap_or(default_strategy);
        let max_batch_size = usize::try_from(config.max_batch_size)
            .map_err(|_| format!("max_batch_size {} is negative", config.max_batch_size))?;
        // Capped like a config's own max_queue_size, so the queue channel can always be built.
        let default_max_queue =
            default_max_queue.clamp(1, crate::model::bounds::MAX_QUEUE_SIZE as usize);
        let (policy, preserve_ordering) = match &config.scheduling_choice {
            None => (PolicyConfig::unbatched(default_max_queue), false),
            Some(SchedulingChoice::DynamicBatching(db)) => (
                dynamic_policy(db, max_batch_size, default_max_queue, strategy)?,
                db.preserve_ordering,
            ),
            Some(SchedulingChoice::SequenceBatching(_)) => {
                return Err("sequence_batching is not supported".into())
            }
            Some(SchedulingChoice::EnsembleScheduling(_)) => {
                return Err("ensemble_scheduling is not supported".into())
            }
        };
        let dynamic_batching = max_batch_size > 0
            && matches!(
                config.scheduling_choice,
                Some(SchedulingChoice::DynamicBatching(_))
            );
        Ok(SchedulerSettings {
            model: config.name.clone(),
            max_batch_size,
            dynamic_batching,
            policy,
            preserve_ordering,
            instances: crate::model::instance_plan::plan(&config.name, &config.instance_group)?,
            inline_below: None,
            split_answers_from: None,
        })
    }
}

fn dynamic_policy(
    db: &ModelDynamicBatching,
    max_batch_size: usize,
    default_max_queue: usize,
    strategy: BatchingStrategy,
) -> Result<PolicyConfig, String> {
    // A model without a batch dimension still gets queue policies and priorities, one request
    // per execution (Triton treats its batch limit as 1).
    let max_batch_rows = max_batch_size.max(1);
    let mut preferred = Vec::new();
    if max_batch_size > 0 {
        for &size in &db.preferred_batch_size {
            let size = usize::try_from(size)
                .ok()
                .filter(|&s| s >= 1 && s <= max_batch_size)
                .ok_or_else(|| {
                    format!(
                        "dynamic_batching: preferred_batch_size {size} must be within 1..={max_batch_size}"
                    )
                })?;
            preferred.push(size);
        }
        preferred.sort_unstable();
        preferred.dedup();
    }

    let priority_levels = u32::try_from(db.priority_levels)
        .map_err(|_| format!("priority_levels {} is too large", db.priority_levels))?;
    let default_priority_level = if priority_levels == 0 {
        0
    } else {
        u32::try_from(db.default_priority_level)
            .ok()
            .filter(|&l| l >= 1 && l <= priority_levels)
            .ok_or_else(|| {
                format!(
                    "dynamic_batching: default_priority_level {} must be within 1..={priority_levels}",
                    db.default_priority_level
                )
            })?
    };

    let default_queue_policy = match &db.default_queue_policy {
        Some(p) => queue_policy(p, "default_queue_policy")?,
        None => QueuePolicy::default(),
    };
    let mut level_policies = BTreeMap::new();
    for (&level, p) in &db.priority_queue_policy {
        let level_u32 = u32::try_from(level)
            .ok()
            .filter(|&l| l >= 1 && l <= priority_levels)
            .ok_or_else(|| {
                format!(
                    "dynamic_batching: priority_queue_policy level {level} must be within 1..={priority_levels}"
                )
            })?;
        level_policies.insert(
            level_u32,
            queue_policy(p, &format!("priority_queue_policy[{level}]"))?,
        );
    }

    // Explicit limits are honoured in full; levels without one share the server-wide default.
    let explicit: usize = level_policies
        .values()
        .chain(std::iter::once(&default_queue_policy))
        .filter_map(|p| p.max_queue_size)
        .fold(0usize, usize::saturating_add);
    let max_total_queue = default_max_queue.max(explicit);

    Ok(PolicyConfig {
        max_batch_rows,
        preferred_batch_sizes: preferred,
        max_queue_delay: Duration::from_micros(db.max_queue_delay_microseconds),
        priority_levels,
        default_priority_level,
        default_queue_policy,
        level_policies,
        max_total_queue,
        strategy,
    })
}

/// Shows the strategy a model runs with in the config it reports (ModelConfig), as auto-completion
/// shows what it filled in: a model that batches with the adaptive strategy through the server's
/// default gets the `batching_strategy` parameter that says so. Configs that set the parameter, and
/// models batched with Triton's strategy (every config before this parameter existed), are left as
/// they were.
pub fn report_strategy(config: &mut ModelConfig, settings: &SchedulerSettings) {
    let strategy = settings.policy.strategy;
    if !settings.dynamic_batching || strategy == BatchingStrategy::Triton {
        return;
    }
    config
        .parameters
        .entry(BatchingStrategy::PARAMETER.to_string())
        .or_insert_with(|| crate::proto::ModelParameter {
            string_value: strategy.as_str().to_string(),
        });
}

fn queue_policy(p: &ModelQueuePolicy, what: &str) -> Result<QueuePolicy, String> {
    let timeout_action = match ProtoTimeoutAction::try_from(p.timeout_action) {
        Ok(ProtoTimeoutAction::Reject) => TimeoutAction::Reject,
        Ok(ProtoTimeoutAction::Delay) => TimeoutAction::Delay,
        Err(_) => {
            return Err(format!(
                "dynamic_batching: {what}: unknown timeout_action {}",
                p.timeout_action
            ))
        }
    };
    Ok(QueuePolicy {
        max_queue_size: (p.max_queue_size > 0).then_some(p.max_queue_size as usize),
        default_timeout: (p.default_timeout_microseconds > 0)
            .then(|| Duration::from_micros(p.default_timeout_microseconds)),
        allow_timeout_override: p.allow_timeout_override,
        timeout_action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::model_instance_group::Kind as GroupKind;
    use crate::proto::{ModelInstanceGroup, ModelQueuePolicy};

    fn batching(db: ModelDynamicBatching, max_batch_size: i32) -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            max_batch_size,
            scheduling_choice: Some(SchedulingChoice::DynamicBatching(db)),
            ..Default::default()
        }
    }

    #[test]
    fn no_dynamic_batching_means_one_request_per_execution() {
        let config = ModelConfig {
            name: "m".into(),
            max_batch_size: 8,
            ..Default::default()
        };
        let s = SchedulerSettings::from_config(&config, 50).unwrap();
        assert!(!s.dynamic_batching);
        assert_eq!(s.policy, PolicyConfig::unbatched(50));
        assert_eq!(
            s.instances,
            vec![InstanceSpec {
                name: "m_0".into(),
                kind: InstanceKind::Cpu
            }]
        );
    }

    #[test]
    fn dynamic_batching_fields_are_carried_over() {
        let mut db = ModelDynamicBatching {
            preferred_batch_size: vec![8, 4, 8],
            max_queue_delay_microseconds: 250,
            preserve_ordering: true,
            priority_levels: 2,
            default_priority_level: 2,
            default_queue_policy: Some(ModelQueuePolicy {
                timeout_action: ProtoTimeoutAction::Delay as i32,
                default_timeout_microseconds: 1000,
                allow_timeout_override: true,
                max_queue_size: 0,
            }),
            ..Default::default()
        };
        db.priority_queue_policy.insert(
            1,
            ModelQueuePolicy {
                max_queue_size: 20_000,
                ..Default::default()
            },
        );
        let s = SchedulerSettings::from_config(&batching(db, 16), 100).unwrap();
        assert!(s.dynamic_batching && s.preserve_ordering);
        let p = &s.policy;
        assert_eq!(p.max_batch_rows, 16);
        assert_eq!(p.preferred_batch_sizes, vec![4, 8]);
        assert_eq!(p.max_queue_delay, Duration::from_micros(250));
        assert_eq!(p.level_for(0), 2);
        assert_eq!(p.queue_policy(2).timeout_action, TimeoutAction::Delay);
        assert_eq!(p.queue_policy(2).max_queue_size, None);
        assert_eq!(p.queue_policy(1).max_queue_size, Some(20_000));
        assert_eq!(p.queue_policy(1).default_timeout, None);
        // An explicit limit larger than the server default is honoured.
        assert_eq!(p.max_total_queue, 20_000);
    }

    #[test]
    fn unlimited_queues_get_the_server_default() {
        let s = SchedulerSettings::from_config(&batching(Default::default(), 4), 77).unwrap();
        assert_eq!(s.policy.max_total_queue, 77);
        assert_eq!(s.policy.default_queue_policy.max_queue_size, None);
    }

    #[test]
    fn batching_without_batch_dimension_is_one_request_at_a_time() {
        let db = ModelDynamicBatching {
            preferred_batch_size: vec![4],
            ..Default::default()
        };
        let s = SchedulerSettings::from_config(&batching(db, 0), 10).unwrap();
        assert!(!s.dynamic_batching);
        assert_eq!(s.policy.max_batch_rows, 1);
        assert!(s.policy.preferred_batch_sizes.is_empty());
    }

    #[test]
    fn invalid_batching_configs_are_refused() {
        let bad_preferred = ModelDynamicBatching {
            preferred_batch_size: vec![32],
            ..Default::default()
        };
        assert!(
            SchedulerSettings::from_config(&batching(bad_preferred, 16), 10)
                .unwrap_err()
                .contains("preferred_batch_size 32")
        );
        let bad_default_level = ModelDynamicBatching {
            priority_levels: 2,
            default_priority_level: 0,
            ..Default::default()
        };
        assert!(SchedulerSettings::from_config(&batching(bad_default_level, 16), 10).is_err());
        let mut bad_level_policy = ModelDynamicBatching {
            priority_levels: 2,
            default_priority_level: 1,
            ..Default::default()
        };
        bad_level_policy
            .priority_queue_policy
            .insert(3, Default::default());
        assert!(SchedulerSettings::from_config(&batching(bad_level_policy, 16), 10).is_err());
        let negative = ModelConfig {
            max_batch_size: -1,
            ..Default::default()
        };
        assert!(SchedulerSettings::from_config(&negative, 10).is_err());
    }

    fn with_strategy(mut config: ModelConfig, value: &str) -> ModelConfig {
        config.parameters.insert(
            BatchingStrategy::PARAMETER.into(),
            crate::proto::ModelParameter {
                string_value: value.into(),
            },
        );
        config
    }

    #[test]
    fn batching_strategy_comes_from_the_parameter_then_the_server_default() {
        let plain = batching(Default::default(), 8);
        let from = |config: &ModelConfig, default| {
            SchedulerSettings::from_config_with_strategy(config, 10, default)
                .map(|s| s.policy.strategy)
        };
        assert_eq!(
            SchedulerSettings::from_config(&plain, 10)
                .unwrap()
                .policy
                .strategy,
            BatchingStrategy::Triton,
            "Triton's semantics unless asked otherwise"
        );
        assert_eq!(
            from(&plain, BatchingStrategy::Adaptive),
            Ok(BatchingStrategy::Adaptive)
        );
        let adaptive = with_strategy(plain.clone(), "adaptive");
        assert_eq!(
            from(&adaptive, BatchingStrategy::Triton),
            Ok(BatchingStrategy::Adaptive)
        );
        let triton = with_strategy(plain.clone(), "triton");
        assert_eq!(
            from(&triton, BatchingStrategy::Adaptive),
            Ok(BatchingStrategy::Triton),
            "the model's own choice wins over the server default"
        );
        let bad = with_strategy(plain, "fastest");
        let err = from(&bad, BatchingStrategy::Triton).unwrap_err();
        assert!(
            err.contains("parameters.batching_strategy")
                && err.contains("\"triton\", \"adaptive\""),
            "{err}"
        );
        // A model without dynamic batching has no window to use; the value is still checked.
        let unbatched = ModelConfig {
            name: "m".into(),
            ..Default::default()
        };
        assert_eq!(
            from(&unbatched, BatchingStrategy::Adaptive),
            Ok(BatchingStrategy::Triton)
        );
        assert!(from(&with_strategy(unbatched, "x"), BatchingStrategy::Triton).is_err());
    }

    #[test]
    fn the_reported_config_shows_a_defaulted_adaptive_strategy() {
        let plain = batching(Default::default(), 8);
        let settings =
            |c: &ModelConfig, d| SchedulerSettings::from_config_with_strategy(c, 10, d).unwrap();
        let mut reported = plain.clone();
        report_strategy(&mut reported, &settings(&plain, BatchingStrategy::Adaptive));
        assert_eq!(
            reported.parameters[BatchingStrategy::PARAMETER].string_value,
            "adaptive"
        );
        // Triton's strategy leaves the config exactly as it was.
        let mut untouched = plain.clone();
        report_strategy(&mut untouched, &settings(&plain, BatchingStrategy::Triton));
        assert_eq!(untouched, plain);
        // So does a model without dynamic batching, whatever the default.
        let unbatched = ModelConfig {
            name: "m".into(),
            ..Default::default()
        };
        let mut reported = unbatched.clone();
        report_strategy(
            &mut reported,
            &settings(&unbatched, BatchingStrategy::Adaptive),
        );
        assert_eq!(reported, unbatched);
    }

    #[test]
    fn instance_groups_expand_per_count_and_device() {
        let config = ModelConfig {
            name: "m".into(),
            instance_group: vec![
                ModelInstanceGroup {
                    name: "cpu".into(),
                    kind: GroupKind::Cpu as i32,
                    count: 2,
                    ..Default::default()
                },
                ModelInstanceGroup {
                    name: "gpu".into(),
                    kind: GroupKind::Gpu as i32,
                    count: 1,
                    gpus: vec![0, 1],
                    ..Default::default()
                },
                ModelInstanceGroup {
                    name: "spare".into(),
                    kind: GroupKind::Cpu as i32,
                    count: 3,
                    passive: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let s = SchedulerSettings::from_config(&config, 10).unwrap();
        let got: Vec<(String, InstanceKind)> =
            s.instances.into_iter().map(|i| (i.name, i.kind)).collect();
        assert_eq!(
            got,
            vec![
                ("cpu_0".into(), InstanceKind::Cpu),
                ("cpu_1".into(), InstanceKind::Cpu),
                ("gpu_0".into(), InstanceKind::Gpu(0)),
                ("gpu_1".into(), InstanceKind::Gpu(1)),
            ]
        );
    }
}
