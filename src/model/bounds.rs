//! Documented bounds on every config value that sizes work, memory or time, checked before a load
//! builds anything. A config from the repository or from a client's RepositoryModelLoad override
//! can otherwise ask for a batch delay of 584,000 years (the batcher then never answers), a
//! hundred thousand sessions, or a queue whose channel cannot even be allocated.
//!
//! Each refusal names the field, the value and the bound. README.md ("Config bounds") lists them.
use std::path::{Component, Path};

use super::{instance_plan, ModelConfig, ModelError};
use crate::proto::model_config::SchedulingChoice;
use crate::proto::{ModelDynamicBatching, ModelQueuePolicy};

/// Largest `max_batch_size`.
pub const MAX_BATCH_SIZE: i32 = 65_536;
/// Most entries in `dynamic_batching.preferred_batch_size`.
pub const MAX_PREFERRED_BATCH_SIZES: usize = 64;
/// Largest `dynamic_batching.max_queue_delay_microseconds`: 60 s.
pub const MAX_QUEUE_DELAY_MICROSECONDS: u64 = 60_000_000;
/// Largest `default_timeout_microseconds` of a queue policy: one hour.
pub const MAX_TIMEOUT_MICROSECONDS: u64 = 3_600_000_000;
/// Largest `max_queue_size` of one queue policy, and of all of a model's policies together.
pub const MAX_QUEUE_SIZE: u64 = 1_000_000;
/// Largest `dynamic_batching.priority_levels`.
pub const MAX_PRIORITY_LEVELS: u64 = 256;
/// Most `model_warmup` entries, and the largest `count` of one.
pub const MAX_WARMUP_SAMPLES: usize = 64;
pub const MAX_WARMUP_COUNT: u32 = 1_000;
/// Largest `intra_op_thread_count` / `inter_op_thread_count` parameter of one session.
pub const MAX_SESSION_THREADS: i64 = 256;
/// `--max-instances-per-model` when not set: this many instances per core of the CPU budget.
pub const DEFAULT_INSTANCES_PER_CORE: usize = 4;

/// Bounds that come from the server's flags rather than constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigLimits {
    /// Most instances (sessions) one model version may build, over all its groups.
    pub max_instances_per_model: usize,
}

impl ConfigLimits {
    /// The default instance bound: a small multiple of the CPU budget.
    pub fn default_max_instances() -> usize {
        crate::runtime::cpu_budget().saturating_mul(DEFAULT_INSTANCES_PER_CORE)
    }
}

impl Default for ConfigLimits {
    fn default() -> Self {
        Self {
            max_instances_per_model: Self::default_max_instances(),
        }
    }
}

/// Checks every bounded value of `config`; the first one out of bounds fails the load.
pub fn check(model: &str, config: &ModelConfig, limits: &ConfigLimits) -> Result<(), ModelError> {
    check_all(config, limits).map_err(|reason| ModelError::InvalidConfig {
        model: model.to_string(),
        reason,
    })
}

fn check_all(config: &ModelConfig, limits: &ConfigLimits) -> Result<(), String> {
    at_most("max_batch_size", config.max_batch_size, MAX_BATCH_SIZE)?;
    if let Some(SchedulingChoice::DynamicBatching(db)) = &config.scheduling_choice {
        check_dynamic_batching(db)?;
    }
    check_instances(config, limits)?;
    check_warmup(config)?;
    check_thread_parameters(config)?;
    check_batching_strategy(config)?;
    check_paths(config)
}

/// `parameters.batching_strategy` must name a strategy the scheduler has.
fn check_batching_strategy(config: &ModelConfig) -> Result<(), String> {
    crate::scheduler::BatchingStrategy::from_parameters(&config.parameters).map(|_| ())
}

fn check_dynamic_batching(db: &ModelDynamicBatching) -> Result<(), String> {
    if db.preferred_batch_size.len() > MAX_PREFERRED_BATCH_SIZES {
        return Err(format!(
            "dynamic_batching.preferred_batch_size lists {} sizes, above the bound {MAX_PREFERRED_BATCH_SIZES}",
            db.preferred_batch_size.len()
        ));
    }
    at_most(
        "dynamic_batching.max_queue_delay_microseconds",
        db.max_queue_delay_microseconds,
        MAX_QUEUE_DELAY_MICROSECONDS,
    )?;
    at_most(
        "dynamic_batching.priority_levels",
        db.priority_levels,
        MAX_PRIORITY_LEVELS,
    )?;
    let mut total_queue: u64 = 0;
    if let Some(policy) = &db.default_queue_policy {
        total_queue += check_queue_policy(policy, "dynamic_batching.default_queue_policy")?;
    }
    for (level, policy) in &db.priority_queue_policy {
        let field = format!("dynamic_batching.priority_queue_policy[{level}]");
        total_queue += check_queue_policy(policy, &field)?;
    }
    at_most(
        "the sum of dynamic_batching max_queue_size values",
        total_queue,
        MAX_QUEUE_SIZE,
    )
}

/// Checks one queue policy; returns its max_queue_size (each is bounded, so sums cannot overflow).
fn check_queue_policy(policy: &ModelQueuePolicy, field: &str) -> Result<u64, String> {
    at_most(
        &format!("{field}.default_timeout_microseconds"),
        policy.default_timeout_microseconds,
        MAX_TIMEOUT_MICROSECONDS,
    )?;
    let size = u64::from(policy.max_queue_size);
    at_most(&format!("{field}.max_queue_size"), size, MAX_QUEUE_SIZE)?;
    Ok(size)
}

fn check_instances(config: &ModelConfig, limits: &ConfigLimits) -> Result<(), String> {
    let bound = limits.max_instances_per_model;
    for (index, group) in config.instance_group.iter().enumerate() {
        let count = usize::try_from(group.count).unwrap_or(0);
        if count > bound {
            return Err(format!(
                "instance_group[{index}].count is {}, above the bound {bound} (--max-instances-per-model)",
                group.count
            ));
        }
    }
    match instance_plan::instance_count(&config.instance_group) {
        Some(total) if total <= bound => Ok(()),
        total => Err(format!(
            "instance_group asks for {} instances in all, above the bound {bound} (--max-instances-per-model)",
            total.map_or_else(|| "more than usize::MAX".to_string(), |t| t.to_string())
        )),
    }
}

fn check_warmup(config: &ModelConfig) -> Result<(), String> {
    if config.model_warmup.len() > MAX_WARMUP_SAMPLES {
        return Err(format!(
            "model_warmup lists {} samples, above the bound {MAX_WARMUP_SAMPLES}",
            config.model_warmup.len()
        ));
    }
    let batch_bound = u32::try_from(config.max_batch_size.max(1)).unwrap_or(1);
    for (index, warmup) in config.model_warmup.iter().enumerate() {
        // Named by index and by the sample's name, which is what its author knows it by.
        let sample = format!("model_warmup[{index}] (warm-up sample '{}')", warmup.name);
        at_most(&format!("{sample}.count"), warmup.count, MAX_WARMUP_COUNT)?;
        at_most(
            &format!("{sample}.batch_size"),
            warmup.batch_size,
            batch_bound,
        )?;
    }
    Ok(())
}

fn check_thread_parameters(config: &ModelConfig) -> Result<(), String> {
    for key in ["intra_op_thread_count", "inter_op_thread_count"] {
        let Some(value) = config.parameters.get(key) else {
            continue;
        };
        // A value that is not an integer is refused by the session plan with its own message.
        if let Ok(threads) = value.string_value.trim().parse::<i64>() {
            at_most(&format!("parameters.{key}"), threads, MAX_SESSION_THREADS)?;
        }
    }
    Ok(())
}

/// File names a config points at must stay inside the model's directory.
fn check_paths(config: &ModelConfig) -> Result<(), String> {
    plain_file_name("default_model_filename", &config.default_model_filename)?;
    for (key, file) in &config.cc_model_filenames {
        plain_file_name(&format!("cc_model_filenames[{key}]"), file)?;
    }
    for (index, warmup) in config.model_warmup.iter().enumerate() {
        for (input, spec) in &warmup.inputs {
            use crate::proto::model_warmup::input::InputDataType;
            if let Some(InputDataType::InputDataFile(file)) = &spec.input_data_type {
                let field = format!("model_warmup[{index}].inputs[{input}].input_data_file");
                relative_inside(&field, file)?;
            }
        }
    }
    Ok(())
}

/// A single path component naming a file in the version directory (empty means the default).
fn plain_file_name(field: &str, name: &str) -> Result<(), String> {
    let plain = name.is_empty()
        || (!name.contains(['/', '\\', '\0'])
            && name != "."
            && name != ".."
            && Path::new(name).components().count() == 1);
    if plain {
        Ok(())
    } else {
        Err(format!(
            "{field} '{}' must be a plain file name inside the model's version directory",
            name.escape_debug()
        ))
    }
}

/// A relative path without `..` (it is resolved inside the model's directory).
fn relative_inside(field: &str, path: &str) -> Result<(), String> {
    let inside = !path.is_empty()
        && !path.contains('\0')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if inside {
        Ok(())
    } else {
        Err(format!(
            "{field} '{}' must be a relative path inside the model directory",
            path.escape_debug()
        ))
    }
}

fn at_most<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    bound: T,
) -> Result<(), String> {
    if value > bound {
        Err(format!("{field} is {value}, above the bound {bound}"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::model_instance_group::Kind;
    use crate::proto::{ModelInstanceGroup, ModelParameter, ModelWarmup};

    const LIMITS: ConfigLimits = ConfigLimits {
        max_instances_per_model: 8,
    };

    fn refused(config: &ModelConfig, needles: &[&str]) {
        let error = check("m", config, &LIMITS).unwrap_err().to_string();
        for needle in needles {
            assert!(error.contains(needle), "'{needle}' missing from: {error}");
        }
    }

    fn batching(db: ModelDynamicBatching) -> ModelConfig {
        ModelConfig {
            max_batch_size: 8,
            scheduling_choice: Some(SchedulingChoice::DynamicBatching(db)),
            ..Default::default()
        }
    }

    #[test]
    fn values_at_their_bounds_are_accepted() {
        let mut db = ModelDynamicBatching {
            max_queue_delay_microseconds: MAX_QUEUE_DELAY_MICROSECONDS,
            priority_levels: MAX_PRIORITY_LEVELS,
            default_priority_level: 1,
            default_queue_policy: Some(ModelQueuePolicy {
                default_timeout_microseconds: MAX_TIMEOUT_MICROSECONDS,
                max_queue_size: (MAX_QUEUE_SIZE / 2) as u32,
                ..Default::default()
            }),
            ..Default::default()
        };
        db.priority_queue_policy.insert(
            1,
            ModelQueuePolicy {
                max_queue_size: (MAX_QUEUE_SIZE / 2) as u32,
                ..Default::default()
            },
        );
        let mut config = batching(db);
        config.instance_group = vec![ModelInstanceGroup {
            kind: Kind::Cpu as i32,
            count: 8,
            ..Default::default()
        }];
        check("m", &config, &LIMITS).unwrap();
    }

    #[test]
    fn the_largest_delay_is_refused_naming_field_and_bound() {
        let db = ModelDynamicBatching {
            max_queue_delay_microseconds: u64::MAX,
            ..Default::default()
        };
        refused(
            &batching(db),
            &[
                "dynamic_batching.max_queue_delay_microseconds",
                "18446744073709551615",
                "bound 60000000",
            ],
        );
    }

    #[test]
    fn queue_policies_are_bounded_per_level_and_in_total() {
        let mut db = ModelDynamicBatching {
            priority_levels: 2,
            default_priority_level: 1,
            ..Default::default()
        };
        db.priority_queue_policy.insert(
            2,
            ModelQueuePolicy {
                default_timeout_microseconds: u64::MAX,
                ..Default::default()
            },
        );
        refused(
            &batching(db.clone()),
            &["priority_queue_policy[2].default_timeout_microseconds"],
        );
        db.priority_queue_policy.insert(
            2,
            ModelQueuePolicy {
                max_queue_size: u32::MAX,
                ..Default::default()
            },
        );
        refused(
            &batching(db.clone()),
            &["priority_queue_policy[2].max_queue_size"],
        );
        let half = ModelQueuePolicy {
            max_queue_size: MAX_QUEUE_SIZE as u32,
            ..Default::default()
        };
        db.priority_queue_policy.insert(1, half);
        db.priority_queue_policy.insert(2, half);
        refused(&batching(db), &["sum of dynamic_batching max_queue_size"]);
        let levels = ModelDynamicBatching {
            priority_levels: u64::MAX,
            ..Default::default()
        };
        refused(&batching(levels), &["priority_levels"]);
    }

    #[test]
    fn instance_counts_are_bounded_by_the_flag() {
        let mut config = ModelConfig {
            instance_group: vec![ModelInstanceGroup {
                kind: Kind::Cpu as i32,
                count: 100_000,
                ..Default::default()
            }],
            ..Default::default()
        };
        refused(
            &config,
            &[
                "instance_group[0].count is 100000",
                "bound 8",
                "--max-instances-per-model",
            ],
        );
        // Within the bound per group, over it in all (count is per listed GPU).
        config.instance_group = vec![ModelInstanceGroup {
            kind: Kind::Gpu as i32,
            count: 4,
            gpus: vec![0, 1, 2],
            ..Default::default()
        }];
        refused(&config, &["12 instances in all", "bound 8"]);
    }

    #[test]
    fn batch_sizes_warmups_and_threads_are_bounded() {
        let config = ModelConfig {
            max_batch_size: MAX_BATCH_SIZE + 1,
            ..Default::default()
        };
        refused(&config, &["max_batch_size is 65537"]);
        let many = ModelDynamicBatching {
            preferred_batch_size: vec![1; MAX_PREFERRED_BATCH_SIZES + 1],
            ..Default::default()
        };
        refused(&batching(many), &["preferred_batch_size lists 65"]);
        let warm = ModelConfig {
            max_batch_size: 4,
            model_warmup: vec![ModelWarmup {
                count: MAX_WARMUP_COUNT + 1,
                batch_size: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        refused(
            &warm,
            &["model_warmup[0] (warm-up sample '').count is 1001"],
        );
        let mut threads = ModelConfig::default();
        threads.parameters.insert(
            "intra_op_thread_count".into(),
            ModelParameter {
                string_value: "100000".into(),
            },
        );
        refused(&threads, &["parameters.intra_op_thread_count is 100000"]);
        let mut strategy = ModelConfig::default();
        strategy.parameters.insert(
            "batching_strategy".into(),
            ModelParameter {
                string_value: "greedy".into(),
            },
        );
        refused(
            &strategy,
            &[
                "parameters.batching_strategy is \"greedy\"",
                "allowed values: \"triton\", \"adaptive\"",
            ],
        );
        for fine in ["triton", "adaptive"] {
            strategy
                .parameters
                .get_mut("batching_strategy")
                .unwrap()
                .string_value = fine.into();
            check("m", &strategy, &LIMITS).unwrap();
        }
    }

    #[test]
    fn paths_escaping_the_model_directory_are_refused() {
        for bad in ["../../etc/passwd", "/etc/passwd", "..", "a/b.onnx"] {
            let config = ModelConfig {
                default_model_filename: bad.into(),
                ..Default::default()
            };
            refused(&config, &["default_model_filename", "plain file name"]);
        }
        let mut config = ModelConfig::default();
        config
            .cc_model_filenames
            .insert("7.5".into(), "../other/model.onnx".into());
        refused(&config, &["cc_model_filenames[7.5]"]);
        let fine = ModelConfig {
            default_model_filename: "model.plan.onnx".into(),
            ..Default::default()
        };
        check("m", &fine, &LIMITS).unwrap();
    }
}
