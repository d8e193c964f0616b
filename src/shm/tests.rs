use super::*;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A POSIX shared-memory object created for one test (a file under /dev/shm, which is what
/// shm_open creates on Linux) and removed when the test ends, pass or fail.
struct ShmObject {
    key: String,
    path: PathBuf,
}

impl ShmObject {
    /// An object of `size` bytes holding 0, 1, 2, ... (mod 251, so offsets are recognisable).
    fn new(label: &str, size: usize) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let key = format!("/onnx-gateway-test-{}-{n}-{label}", std::process::id());
        let path = region::path_for_test(&key).expect("test key is valid");
        let contents: Vec<u8> = (0..size).map(pattern).collect();
        std::fs::write(&path, contents).expect("create shm object");
        Self { key, path }
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read shm object")
    }

    /// Writes through the file, as another process writing to the object would.
    fn write_at(&self, offset: u64, data: &[u8]) {
        let file = OpenOptions::new().write(true).open(&self.path).unwrap();
        file.write_all_at(data, offset).unwrap();
    }

    fn truncate(&self, size: u64) {
        let file = OpenOptions::new().write(true).open(&self.path).unwrap();
        file.set_len(size).unwrap();
    }
}

impl Drop for ShmObject {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn expected(range: Range<usize>) -> Vec<u8> {
    range.map(pattern).collect()
}

#[test]
fn read_returns_the_registered_range_at_any_alignment() {
    let page = 4096;
    let object = ShmObject::new("read", 3 * page);
    let shm = ShmRegistry::new();
    // An offset that is not page-aligned, and a read that crosses a page boundary.
    shm.register("in", &object.key, 4097, 2 * page as u64 - 1)
        .unwrap();

    let bytes = shm.read("in", 4090, 20).unwrap();
    assert_eq!(&bytes[..], &expected(4097 + 4090..4097 + 4110)[..]);
    let whole = shm.read("in", 0, 2 * page as u64 - 1).unwrap();
    assert_eq!(&whole[..], &expected(4097..3 * page)[..]);
}

#[test]
fn read_is_a_snapshot_taken_at_the_call() {
    let object = ShmObject::new("snapshot", 64);
    let shm = ShmRegistry::new();
    shm.register("in", &object.key, 0, 64).unwrap();
    let bytes = shm.read("in", 16, 4).unwrap();
    // The data was copied out: a later change (or truncation) by the client cannot reach it, so
    // nothing that holds it can fault.
    object.write_at(16, &[9, 9, 9, 9]);
    object.truncate(0);
    assert_eq!(&bytes[..], &expected(16..20)[..]);
}

#[test]
fn write_lands_in_the_object_at_region_offset_plus_offset() {
    let object = ShmObject::new("write", 256);
    let shm = ShmRegistry::new();
    shm.register("out", &object.key, 100, 50).unwrap();
    shm.write("out", 10, &[1, 2, 3]).unwrap();

    let mut want = expected(0..256);
    want[110..113].copy_from_slice(&[1, 2, 3]);
    assert_eq!(object.contents(), want);
}

#[test]
fn output_reservation_writes_at_most_its_size() {
    let object = ShmObject::new("output", 64);
    let shm = ShmRegistry::new();
    shm.register("out", &object.key, 0, 64).unwrap();
    let output = shm.output("out", 8, 4).unwrap();
    assert_eq!(output.byte_size(), 4);
    assert_eq!(output.region_name(), "out");

    let err = output.write(&[7; 5]).unwrap_err();
    assert!(matches!(err, ShmError::OutOfBounds { .. }), "{err}");
    assert_eq!(object.contents(), expected(0..64), "nothing written");

    output.write(&[7; 3]).unwrap();
    assert_eq!(&object.contents()[8..12], &[7, 7, 7, pattern(11)]);
}

#[test]
fn out_of_bounds_ranges_are_refused_naming_the_region() {
    let object = ShmObject::new("bounds", 64);
    let shm = ShmRegistry::new();
    shm.register("r", &object.key, 0, 32).unwrap();

    let cases: [(u64, u64, &str); 5] = [
        (33, 0, "Invalid offset for shared memory region: 'r'"),
        (u64::MAX, 1, "Invalid offset for shared memory region: 'r'"),
        (
            0,
            33,
            "Invalid offset + byte size for shared memory region: 'r'",
        ),
        (
            31,
            2,
            "Invalid offset + byte size for shared memory region: 'r'",
        ),
        (
            1,
            u64::MAX,
            "Invalid offset + byte size for shared memory region: 'r'",
        ),
    ];
    for (offset, size, message) in cases {
        let err = shm.read("r", offset, size).unwrap_err();
        assert_eq!(err.to_string(), message, "read({offset}, {size})");
        assert_eq!(err.kind(), ShmErrorKind::InvalidArgument);
        let err = shm.output("r", offset, size).unwrap_err();
        assert_eq!(err.to_string(), message, "output({offset}, {size})");
    }
    let err = shm.write("r", 30, &[0; 3]).unwrap_err();
    assert_eq!(err.kind(), ShmErrorKind::InvalidArgument);
    assert_eq!(object.contents(), expected(0..64), "nothing written");

    // The exact end of the region is a valid place for an empty tensor.
    assert!(shm.read("r", 32, 0).unwrap().is_empty());
}

#[test]
fn unknown_region_is_invalid_argument_for_tensors_and_not_found_for_status() {
    let shm = ShmRegistry::new();
    let err = shm.read("nope", 0, 4).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Unable to find shared memory region: 'nope'"
    );
    assert_eq!(err.kind(), ShmErrorKind::InvalidArgument);
    let err = shm.write("nope", 0, &[1]).unwrap_err();
    assert_eq!(err.kind(), ShmErrorKind::InvalidArgument);

    let err = shm.status(Some("nope")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Unable to find system shared memory region: 'nope'"
    );
    assert_eq!(err.kind(), ShmErrorKind::NotFound);
}

#[test]
fn duplicate_name_is_already_exists_and_keeps_the_first_region() {
    let first = ShmObject::new("dup1", 16);
    let second = ShmObject::new("dup2", 16);
    second.write_at(0, &[200; 16]);
    let shm = ShmRegistry::new();
    shm.register("r", &first.key, 0, 16).unwrap();

    let err = shm.register("r", &second.key, 0, 16).unwrap_err();
    assert_eq!(
        err.to_string(),
        "shared memory region 'r' already in manager"
    );
    assert_eq!(err.kind(), ShmErrorKind::AlreadyExists);
    assert_eq!(&shm.read("r", 0, 16).unwrap()[..], &expected(0..16)[..]);
}

#[test]
fn the_same_key_may_back_several_regions() {
    let object = ShmObject::new("shared", 64);
    let shm = ShmRegistry::new();
    shm.register("a", &object.key, 0, 32).unwrap();
    shm.register("b", &object.key, 32, 32).unwrap();
    shm.write("b", 0, &[5]).unwrap();
    assert_eq!(shm.read("b", 0, 1).unwrap()[0], 5);
    assert_eq!(&shm.read("a", 0, 32).unwrap()[..], &expected(0..32)[..]);
}

#[test]
fn registration_is_checked_against_the_object() {
    let object = ShmObject::new("reg", 64);
    let shm = ShmRegistry::new();

    let err = shm.register("r", &object.key, 32, 33).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("failed to register shared memory region 'r': invalid args"),
        "{err}"
    );
    assert_eq!(err.kind(), ShmErrorKind::InvalidArgument);

    let err = shm.register("r", &object.key, u64::MAX, 2).unwrap_err();
    assert_eq!(err.kind(), ShmErrorKind::InvalidArgument, "{err}");

    let err = shm.register("r", &object.key, 0, 0).unwrap_err();
    assert_eq!(err.kind(), ShmErrorKind::InvalidArgument, "{err}");

    let missing = format!("{}-missing", object.key);
    let err = shm.register("r", &missing, 0, 1).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("Unable to open shared memory region: '{missing}'")),
        "{err}"
    );
    assert_eq!(err.kind(), ShmErrorKind::Internal);

    assert!(shm.status(None).unwrap().is_empty(), "nothing registered");
    // A key without the leading slash names the same object, as with shm_open.
    shm.register("r", object.key.trim_start_matches('/'), 0, 64)
        .unwrap();
}

#[test]
fn keys_that_are_not_shm_names_are_refused_before_opening_anything() {
    let shm = ShmRegistry::new();
    for key in ["", "/", "//", ".", "/..", "../etc/passwd", "/a/b", "/x\0y"] {
        let err = shm.register("r", key, 0, 1).unwrap_err();
        assert!(matches!(err, ShmError::InvalidKey { .. }), "{key:?}: {err}");
        assert_eq!(err.kind(), ShmErrorKind::InvalidArgument);
    }
}

#[test]
fn a_symlink_planted_in_dev_shm_is_not_followed() {
    let target = tempfile::NamedTempFile::new().unwrap();
    target.as_file().set_len(64).unwrap();
    let key = format!("/onnx-gateway-test-{}-symlink", std::process::id());
    let link = region::path_for_test(&key).unwrap();
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(target.path(), &link).unwrap();

    let shm = ShmRegistry::new();
    let result = shm.register("r", &key, 0, 64);
    let _ = std::fs::remove_file(&link);
    let err = result.unwrap_err();
    assert!(matches!(err, ShmError::OpenFailed { .. }), "{err}");
}

#[test]
fn status_lists_regions_sorted_by_name() {
    let object = ShmObject::new("status", 64);
    let shm = ShmRegistry::new();
    shm.register("b", &object.key, 16, 8).unwrap();
    shm.register("a", &object.key, 0, 64).unwrap();

    let all = shm.status(None).unwrap();
    assert_eq!(
        all,
        vec![
            RegionStatus {
                name: "a".into(),
                key: object.key.clone(),
                offset: 0,
                byte_size: 64
            },
            RegionStatus {
                name: "b".into(),
                key: object.key.clone(),
                offset: 16,
                byte_size: 8
            },
        ]
    );
    assert_eq!(shm.status(Some("b")).unwrap(), vec![all[1].clone()]);
}

#[test]
fn unregister_forgets_one_and_tolerates_unknown_names() {
    let object = ShmObject::new("unreg", 64);
    let shm = ShmRegistry::new();
    shm.register("a", &object.key, 0, 8).unwrap();
    shm.register("b", &object.key, 8, 8).unwrap();

    shm.unregister("a").unwrap();
    shm.unregister("never-registered").unwrap();
    let names: Vec<_> = shm
        .status(None)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["b"]);
    assert!(matches!(
        shm.read("a", 0, 1),
        Err(ShmError::UnknownRegion { .. })
    ));
    // The name is free again.
    shm.register("a", &object.key, 0, 8).unwrap();

    shm.unregister_all().unwrap();
    assert!(shm.status(None).unwrap().is_empty());
}

#[test]
fn data_held_by_a_request_outlives_unregister_and_the_registry() {
    let object = ShmObject::new("held", 64);
    let shm = ShmRegistry::new();
    shm.register("in", &object.key, 0, 64).unwrap();
    shm.register("out", &object.key, 0, 64).unwrap();
    let input = shm.read("in", 8, 8).unwrap();
    let output = shm.output("out", 32, 4).unwrap();

    shm.unregister("in").unwrap();
    shm.unregister_all().unwrap();
    drop(shm);
    // Even the object's name may be gone: the open descriptor keeps the object.
    let path = object.path.clone();
    std::fs::remove_file(&path).unwrap();

    assert_eq!(&input[..], &expected(8..16)[..]);
    output.write(&[1, 2, 3, 4]).unwrap();
    let clone = input.slice(2..4);
    drop(input);
    assert_eq!(&clone[..], &expected(10..12)[..]);
}

#[test]
fn a_region_truncated_by_the_client_is_refused_instead_of_faulting() {
    let object = ShmObject::new("trunc", 8192);
    let shm = ShmRegistry::new();
    shm.register("r", &object.key, 0, 8192).unwrap();
    object.truncate(100);

    assert!(shm.read("r", 0, 100).is_ok(), "still-backed bytes are fine");
    let err = shm.read("r", 4096, 16).unwrap_err();
    assert!(matches!(err, ShmError::Truncated { .. }), "{err}");
    assert_eq!(err.kind(), ShmErrorKind::InvalidArgument);
    let err = shm.write("r", 5000, &[1]).unwrap_err();
    assert!(matches!(err, ShmError::Truncated { .. }), "{err}");
}

#[test]
fn truncation_racing_reads_and_writes_never_faults() {
    // A mapped region would raise SIGBUS here (touching pages past the end of the object) and
    // kill the test process; reads and writes through the descriptor only ever see errors.
    let object = ShmObject::new("race", 1 << 16);
    let shm = Arc::new(ShmRegistry::new());
    shm.register("r", &object.key, 0, 1 << 16).unwrap();
    let output = shm.output("r", 0, 1 << 16).unwrap();
    let reader = {
        let shm = Arc::clone(&shm);
        std::thread::spawn(move || {
            let mut refused = 0;
            for _ in 0..2000 {
                match shm.read("r", 0, 1 << 16) {
                    Ok(bytes) => assert_eq!(bytes.len(), 1 << 16),
                    Err(ShmError::Truncated { .. }) => refused += 1,
                    Err(other) => panic!("unexpected error {other}"),
                }
            }
            refused
        })
    };
    for i in 0..2000u64 {
        object.truncate(if i % 2 == 0 { 10 } else { 1 << 16 });
        let _ = output.write(&[7u8; 4096]);
    }
    object.truncate(10);
    reader.join().expect("reader never faults");
    let err = shm.read("r", 0, 1 << 16).unwrap_err();
    assert!(matches!(err, ShmError::Truncated { .. }), "{err}");
}

#[test]
fn a_disabled_registry_refuses_everything() {
    let object = ShmObject::new("disabled", 16);
    let shm = ShmRegistry::disabled();
    assert!(!shm.is_enabled());
    let results = [
        shm.register("r", &object.key, 0, 16).err(),
        shm.unregister("r").err(),
        shm.unregister_all().err(),
        shm.status(None).err(),
        shm.read("r", 0, 1).err(),
        shm.write("r", 0, &[1]).err(),
    ];
    for err in results {
        let err = err.expect("refused");
        assert!(matches!(err, ShmError::Disabled));
        assert_eq!(err.kind(), ShmErrorKind::Unavailable);
        assert!(err.to_string().contains("--allow-client-shm=true"));
    }
}

#[test]
fn concurrent_register_unregister_read_and_write_never_crash() {
    let object = ShmObject::new("race", 4096);
    let shm = ShmRegistry::new();
    let names = ["r0", "r1", "r2"];
    std::thread::scope(|scope| {
        for worker in 0..4usize {
            let shm = &shm;
            let key = object.key.as_str();
            scope.spawn(move || {
                let mut held = Vec::new();
                for i in 0..500usize {
                    let name = names[(i + worker) % names.len()];
                    match (i + worker) % 5 {
                        0 => match shm.register(name, key, 0, 4096) {
                            Ok(()) | Err(ShmError::AlreadyExists { .. }) => {}
                            Err(e) => panic!("register: {e}"),
                        },
                        1 => shm.unregister(name).unwrap(),
                        2 => match shm.read(name, 1024, 16) {
                            Ok(bytes) => {
                                // Writers below only touch [0, 1024): this range never changes.
                                assert_eq!(&bytes[..], &expected(1024..1040)[..]);
                                held.push(bytes);
                            }
                            Err(ShmError::UnknownRegion { .. }) => {}
                            Err(e) => panic!("read: {e}"),
                        },
                        3 => match shm.write(name, (worker * 8) as u64, &[worker as u8; 8]) {
                            Ok(()) | Err(ShmError::UnknownRegion { .. }) => {}
                            Err(e) => panic!("write: {e}"),
                        },
                        _ => {
                            let _ = shm.status(None).unwrap();
                            if i % 50 == 4 {
                                shm.unregister_all().unwrap();
                            }
                        }
                    }
                }
                // Everything read stays valid after the regions churned underneath.
                for bytes in held {
                    assert_eq!(&bytes[..], &expected(1024..1040)[..]);
                }
            });
        }
    });
}

#[test]
fn error_kinds_follow_triton() {
    let io = || io::Error::from(io::ErrorKind::NotFound);
    let name = || "r".to_owned();
    let cases = [
        (ShmError::Disabled, ShmErrorKind::Unavailable),
        (
            ShmError::AlreadyExists { name: name() },
            ShmErrorKind::AlreadyExists,
        ),
        (ShmError::NotFound { name: name() }, ShmErrorKind::NotFound),
        (
            ShmError::OpenFailed {
                key: name(),
                source: io(),
            },
            ShmErrorKind::Internal,
        ),
        (
            ShmError::MapFailed {
                name: name(),
                source: io(),
            },
            ShmErrorKind::InvalidArgument,
        ),
    ];
    for (err, kind) in cases {
        assert_eq!(err.kind(), kind, "{err}");
    }
}
