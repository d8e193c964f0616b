//! Poll mode: notices models added to, changed in or removed from the repository by comparing a
//! fingerprint (paths, sizes, modification times) of each model directory between scans.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::SystemTime;

/// What one model directory looked like at a scan.
pub type Fingerprint = BTreeSet<(String, u64, Option<SystemTime>)>;

/// Fingerprints of every model directory, by model name.
pub type Scan = BTreeMap<String, Fingerprint>;

/// Fingerprints of every model directory in the repository. Blocking (it walks the directories).
pub fn scan(repo: &Path, models: &[String]) -> Scan {
    models
        .iter()
        .map(|m| (m.clone(), fingerprint(&repo.join(m))))
        .collect()
}

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = Fingerprint::new();
    walk(dir, dir, 0, &mut out);
    out
}

/// Model directories are shallow (config, version dirs, model files); the depth bound keeps a
/// pathological tree from stalling the scan.
fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Fingerprint) {
    if depth > 4 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        let rel = path
            .strip_prefix(root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if meta.is_dir() {
            out.insert((rel + "/", 0, None));
            walk(root, &path, depth + 1, out);
        } else {
            out.insert((rel, meta.len(), meta.modified().ok()));
        }
    }
}

/// The changes between two scans.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RepositoryChanges {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

pub fn diff(
    before: &BTreeMap<String, Fingerprint>,
    after: &BTreeMap<String, Fingerprint>,
) -> RepositoryChanges {
    let mut changes = RepositoryChanges::default();
    for (name, print) in after {
        match before.get(name) {
            None => changes.added.push(name.clone()),
            Some(old) if old != print => changes.changed.push(name.clone()),
            Some(_) => {}
        }
    }
    changes.removed = before
        .keys()
        .filter(|n| !after.contains_key(*n))
        .cloned()
        .collect();
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_added_changed_removed() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        std::fs::create_dir_all(repo.join("a/1")).unwrap();
        std::fs::write(repo.join("a/1/model.onnx"), b"x").unwrap();
        std::fs::create_dir_all(repo.join("b/1")).unwrap();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let before = scan(repo, &names(&["a", "b"]));
        std::fs::create_dir_all(repo.join("a/2")).unwrap();
        std::fs::create_dir_all(repo.join("c/1")).unwrap();
        let after = scan(repo, &names(&["a", "c"]));
        let d = diff(&before, &after);
        assert_eq!(d.added, vec!["c"]);
        assert_eq!(d.changed, vec!["a"]);
        assert_eq!(d.removed, vec!["b"]);
        assert_eq!(diff(&after, &after), RepositoryChanges::default());
    }
}
