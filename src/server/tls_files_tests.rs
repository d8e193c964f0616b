//! The loading and reloading of valid certificates is tested end to end with certificates made at
//! test time (tests/python/test_security.py); here, what each bad flag or file is told.
use super::*;

const NOT_SET: Option<PathBuf> = None;

fn flags<'a>(
    mutual: bool,
    cert: &'a Option<PathBuf>,
    key: &'a Option<PathBuf>,
    root: &'a Option<PathBuf>,
) -> TlsFlags<'a> {
    TlsFlags {
        door: "HTTP",
        on: true,
        mutual,
        cert: ("--http-server-cert", cert),
        key: ("--http-server-key", key),
        root: ("--http-root-cert", root),
        alpn: &[b"h2"],
    }
}

fn error_of(result: anyhow::Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", result.expect_err("an error"))
}

#[test]
fn tls_off_needs_no_file() {
    let off = TlsFlags {
        on: false,
        ..flags(false, &NOT_SET, &NOT_SET, &NOT_SET)
    };
    assert!(TlsFiles::from_flags(off).unwrap().is_none());
}

#[test]
fn a_missing_flag_is_named_with_its_door() {
    let cert = Some(PathBuf::from("cert.pem"));
    let message = error_of(TlsFiles::from_flags(flags(
        false, &NOT_SET, &NOT_SET, &NOT_SET,
    )));
    assert_eq!(message, "HTTP TLS is on but --http-server-cert is not set");
    let message = error_of(TlsFiles::from_flags(flags(
        false, &cert, &NOT_SET, &NOT_SET,
    )));
    assert_eq!(message, "HTTP TLS is on but --http-server-key is not set");
    let message = error_of(TlsFiles::from_flags(flags(true, &cert, &cert, &NOT_SET)));
    assert_eq!(message, "HTTP TLS is on but --http-root-cert is not set");
    // The CA is only required for mutual TLS.
    let files = TlsFiles::from_flags(flags(false, &cert, &cert, &NOT_SET)).unwrap();
    assert!(files.unwrap().client_ca.is_none());
}

#[test]
fn a_bad_file_is_named_by_its_flag_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Some(dir.path().join("absent.pem"));
    let not_pem = dir.path().join("notes.txt");
    std::fs::write(&not_pem, "no certificate here\n").unwrap();
    let not_pem = Some(not_pem);

    let load = |cert: &Option<PathBuf>, key: &Option<PathBuf>| {
        let files = TlsFiles::from_flags(flags(false, cert, key, &NOT_SET)).unwrap();
        ReloadingTls::load(files.unwrap())
    };
    let message = error_of(load(&missing, &missing));
    assert!(
        message.starts_with("cannot read --http-server-cert "),
        "{message}"
    );
    assert!(message.contains("absent.pem"), "{message}");
    let message = error_of(load(&not_pem, &not_pem));
    assert!(message.starts_with("--http-server-cert "), "{message}");
    assert!(message.contains("holds no certificate"), "{message}");
}
