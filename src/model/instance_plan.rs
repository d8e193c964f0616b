//! The one instance plan: which model instances a config's instance groups ask for, in order. The
//! manager builds one session per entry and the scheduler starts one worker per entry, so both read
//! the same list (they used to expand the groups with two different functions, and a passive first
//! group or `count: 2, gpus: [0, 1]` gave them different sets).
use crate::proto::model_instance_group::Kind as GroupKind;
use crate::proto::ModelInstanceGroup;
use crate::scheduler::{InstanceKind, InstanceSpec};

/// Instances the groups ask for, counted without building the list (and without overflow), so an
/// absurd `count` is refused before anything is allocated. Passive groups are not counted: they
/// are never built. None when the number does not fit in a usize.
pub fn instance_count(groups: &[ModelInstanceGroup]) -> Option<usize> {
    if groups.is_empty() {
        return Some(1);
    }
    groups
        .iter()
        .filter(|g| !g.passive)
        .try_fold(0usize, |total, group| {
            let per_device = usize::try_from(group.count.max(1)).ok()?;
            let devices = devices_of(group).ok()?.len();
            total.checked_add(per_device.checked_mul(devices)?)
        })
}

/// Expands instance groups into instances. KIND_GPU places `count` instances on each listed GPU
/// (device 0 when none is listed); KIND_AUTO does the same when it lists GPUs and runs on the CPU
/// otherwise; KIND_CPU runs on the CPU. A count of 0 means 1, and a config without groups gets one
/// CPU instance `<model>_0`. Passive groups are skipped: Triton loads them but never schedules onto
/// them. Instance names are `<group name>_<index within the group>`.
pub fn plan(model: &str, groups: &[ModelInstanceGroup]) -> Result<Vec<InstanceSpec>, String> {
    if groups.is_empty() {
        return Ok(vec![InstanceSpec {
            name: format!("{model}_0"),
            kind: InstanceKind::Cpu,
        }]);
    }
    for (group_index, group) in groups.iter().enumerate() {
        if group.count < 0 {
            return Err(format!(
                "instance_group {group_index}: count {} is negative",
                group.count
            ));
        }
        devices_of(group).map_err(|e| format!("instance_group {group_index}: {e}"))?;
    }
    let total = instance_count(groups)
        .ok_or_else(|| "instance_group: the number of instances overflows".to_string())?;
    let mut out = Vec::with_capacity(total);
    for (group_index, group) in groups.iter().enumerate() {
        if group.passive {
            continue;
        }
        let name = if group.name.is_empty() {
            format!("{model}_{group_index}")
        } else {
            group.name.clone()
        };
        let count = group.count.max(1) as usize;
        let mut index = 0;
        for device in devices_of(group)? {
            for _ in 0..count {
                out.push(InstanceSpec {
                    name: format!("{name}_{index}"),
                    kind: device,
                });
                index += 1;
            }
        }
    }
    if out.is_empty() {
        return Err("instance_group: every group is passive, no instance to schedule on".into());
    }
    Ok(out)
}

/// The devices one group's instances are spread over (each gets `count` instances).
fn devices_of(group: &ModelInstanceGroup) -> Result<Vec<InstanceKind>, String> {
    let kind =
        GroupKind::try_from(group.kind).map_err(|_| format!("unknown kind {}", group.kind))?;
    Ok(match kind {
        GroupKind::Gpu if group.gpus.is_empty() => vec![InstanceKind::Gpu(0)],
        GroupKind::Gpu | GroupKind::Auto if !group.gpus.is_empty() => {
            group.gpus.iter().map(|&g| InstanceKind::Gpu(g)).collect()
        }
        _ => vec![InstanceKind::Cpu],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, kind: GroupKind, count: i32, gpus: &[i32]) -> ModelInstanceGroup {
        ModelInstanceGroup {
            name: name.into(),
            kind: kind as i32,
            count,
            gpus: gpus.to_vec(),
            ..Default::default()
        }
    }

    fn kinds(groups: &[ModelInstanceGroup]) -> Vec<(String, InstanceKind)> {
        plan("m", groups)
            .unwrap()
            .into_iter()
            .map(|i| (i.name, i.kind))
            .collect()
    }

    #[test]
    fn no_group_is_one_cpu_instance() {
        assert_eq!(kinds(&[]), vec![("m_0".into(), InstanceKind::Cpu)]);
        assert_eq!(instance_count(&[]), Some(1));
    }

    #[test]
    fn count_applies_per_listed_gpu() {
        let groups = [group("g", GroupKind::Gpu, 2, &[0, 1])];
        assert_eq!(
            kinds(&groups),
            vec![
                ("g_0".into(), InstanceKind::Gpu(0)),
                ("g_1".into(), InstanceKind::Gpu(0)),
                ("g_2".into(), InstanceKind::Gpu(1)),
                ("g_3".into(), InstanceKind::Gpu(1)),
            ]
        );
        assert_eq!(instance_count(&groups), Some(4));
    }

    #[test]
    fn a_passive_first_group_is_skipped_by_every_instance() {
        let mut passive = group("spare", GroupKind::Gpu, 3, &[1]);
        passive.passive = true;
        let groups = [passive, group("cpu", GroupKind::Cpu, 2, &[])];
        assert_eq!(
            kinds(&groups),
            vec![
                ("cpu_0".into(), InstanceKind::Cpu),
                ("cpu_1".into(), InstanceKind::Cpu)
            ]
        );
        assert_eq!(instance_count(&groups), Some(2));
    }

    #[test]
    fn auto_uses_listed_gpus_else_the_cpu() {
        assert_eq!(
            kinds(&[group("a", GroupKind::Auto, 1, &[])]),
            vec![("a_0".into(), InstanceKind::Cpu)]
        );
        assert_eq!(
            kinds(&[group("a", GroupKind::Auto, 1, &[2])]),
            vec![("a_0".into(), InstanceKind::Gpu(2))]
        );
        assert_eq!(
            kinds(&[group("g", GroupKind::Gpu, 0, &[])]),
            vec![("g_0".into(), InstanceKind::Gpu(0))]
        );
    }

    #[test]
    fn unnamed_groups_are_named_after_the_model_and_index() {
        let groups = [
            group("", GroupKind::Cpu, 1, &[]),
            group("", GroupKind::Cpu, 1, &[]),
        ];
        let names: Vec<String> = kinds(&groups).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["m_0_0", "m_1_0"]);
    }

    #[test]
    fn refusals_name_the_group() {
        let mut only_passive = group("p", GroupKind::Cpu, 1, &[]);
        only_passive.passive = true;
        assert!(plan("m", &[only_passive]).unwrap_err().contains("passive"));
        let negative = group("n", GroupKind::Cpu, -1, &[]);
        assert!(plan("m", &[negative]).unwrap_err().contains("negative"));
        let unknown = ModelInstanceGroup {
            kind: 42,
            ..Default::default()
        };
        assert!(plan("m", &[unknown]).unwrap_err().contains("unknown kind"));
    }

    #[test]
    fn counting_never_overflows() {
        let gpus: Vec<i32> = (0..8).collect();
        let huge = vec![group("h", GroupKind::Gpu, i32::MAX, &gpus); 4];
        assert_eq!(
            instance_count(&huge),
            Some(i32::MAX as usize * 8 * 4),
            "fits in a 64-bit usize"
        );
        assert_eq!(
            instance_count(&[group("c", GroupKind::Cpu, 100_000, &[])]),
            Some(100_000)
        );
    }
}
