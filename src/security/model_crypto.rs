//! Encrypted model files (`<default_model_filename>.enc`) and the keys that open them.
//!
//! Format: 8 bytes magic `OGWENC01`, 8 bytes key id (the first 8 bytes of SHA-256 of the 32-byte
//! key), 12 bytes nonce, then the AES-256-GCM ciphertext with its 16-byte tag appended. The
//! additional authenticated data is `<model name>/<version>`, so a file copied to another model or
//! version fails authentication instead of serving under a name it was not made for.
//!
//! Keys and plaintext live in `Zeroizing` buffers: they are wiped when dropped. The plaintext is
//! never written anywhere; ONNX Runtime gets it from memory.
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::{Aead, AeadCore, AeadInPlace, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub const MAGIC: &[u8; 8] = b"OGWENC01";
pub const KEY_ID_LEN: usize = 8;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
pub const HEADER_LEN: usize = MAGIC.len() + KEY_ID_LEN + NONCE_LEN;
/// The suffix an encrypted model file adds to `default_model_filename`.
pub const ENCRYPTED_SUFFIX: &str = ".enc";

/// Identifies a key without revealing it: the first 8 bytes of its SHA-256.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// One 32-byte AES-256 key, wiped on drop. Its Debug shows only the key id.
#[derive(Clone)]
pub struct ModelKey {
    bytes: Zeroizing<[u8; 32]>,
    id: KeyId,
}

impl fmt::Debug for ModelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelKey({})", self.id)
    }
}

impl ModelKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let bytes = Zeroizing::new(bytes);
        let digest = Sha256::digest(bytes.as_slice());
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Self {
            bytes,
            id: KeyId(id),
        }
    }

    /// A key file's content: exactly 32 raw bytes, or 64 hex characters (surrounding whitespace
    /// ignored; a raw key followed by a newline is accepted too).
    pub fn parse(content: &[u8]) -> Result<Self, KeyError> {
        if let Ok(raw) = <[u8; 32]>::try_from(content) {
            return Ok(Self::from_bytes(raw));
        }
        let trimmed = content.trim_ascii();
        if trimmed.len() == 64 {
            let mut key = Zeroizing::new([0u8; 32]);
            for (i, pair) in trimmed.chunks(2).enumerate() {
                key[i] = (hex_value(pair[0]).ok_or(KeyError::NotHex)? << 4)
                    | hex_value(pair[1]).ok_or(KeyError::NotHex)?;
            }
            return Ok(Self::from_bytes(*key));
        }
        if let Ok(raw) = <[u8; 32]>::try_from(trimmed) {
            return Ok(Self::from_bytes(raw));
        }
        Err(KeyError::Length(content.len()))
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(self.bytes.as_slice()))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Why a key file cannot be used. Never contains key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "a model key file must hold 32 raw bytes or 64 hex characters, this one holds {0} bytes"
    )]
    Length(usize),
    #[error("a model key file of 64 characters must be hexadecimal")]
    NotHex,
}

/// The keys given with `--model-key-file`, found by key id (several keys allow rotation).
#[derive(Debug, Default, Clone)]
pub struct KeyRing {
    keys: Vec<ModelKey>,
}

impl KeyRing {
    pub fn new(keys: Vec<ModelKey>) -> Self {
        let mut ring = Self::default();
        for key in keys {
            if ring.get(key.id()).is_none() {
                ring.keys.push(key);
            }
        }
        ring
    }

    /// Reads every key file; the error names the file (never its content).
    pub fn from_files(paths: &[PathBuf]) -> Result<Self, String> {
        let keys = paths
            .iter()
            .map(|path| {
                let content = Zeroizing::new(std::fs::read(path).map_err(|e| {
                    format!("cannot read --model-key-file {}: {e}", path.display())
                })?);
                ModelKey::parse(&content)
                    .map_err(|e| format!("--model-key-file {}: {e}", path.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(keys))
    }

    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(ModelKey::id).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn get(&self, id: KeyId) -> Option<&ModelKey> {
        self.keys.iter().find(|k| k.id() == id)
    }
}

/// A decrypted ONNX graph: shared by the sessions of one model version while they are built, wiped
/// when the last holder drops it. Debug shows the length only.
#[derive(Clone, PartialEq)]
pub struct PlaintextModel(Arc<Zeroizing<Vec<u8>>>);

impl PlaintextModel {
    pub fn bytes(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl fmt::Debug for PlaintextModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlaintextModel({} bytes)", self.0.len())
    }
}

/// Why an encrypted model file cannot be opened. Each text says what to check.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecryptError {
    #[error("encrypted model file is {0} bytes, shorter than the {min} bytes of header and tag", min = HEADER_LEN + TAG_LEN)]
    TooShort(usize),
    #[error("not an encrypted model file: it does not start with the magic OGWENC01")]
    BadMagic,
    #[error("no --model-key-file holds the key with id {0} that this file was encrypted with")]
    UnknownKey(KeyId),
    #[error("decryption failed: the file was altered, or it was encrypted for another model or version than '{0}'")]
    Authentication(String),
    #[error("cannot read the encrypted model file: {0}")]
    Read(String),
}

/// The additional authenticated data binding a file to its place in the repository.
pub fn associated_data(model: &str, version: i64) -> String {
    format!("{model}/{version}")
}

/// Decrypts an encrypted model file's bytes for `model` version `version`.
pub fn decrypt_model(
    keys: &KeyRing,
    file: Vec<u8>,
    model: &str,
    version: i64,
) -> Result<PlaintextModel, DecryptError> {
    let mut buffer = Zeroizing::new(file);
    if buffer.len() < HEADER_LEN + TAG_LEN {
        return Err(DecryptError::TooShort(buffer.len()));
    }
    if &buffer[..MAGIC.len()] != MAGIC {
        return Err(DecryptError::BadMagic);
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&buffer[MAGIC.len()..MAGIC.len() + KEY_ID_LEN]);
    let key = keys
        .get(KeyId(id))
        .ok_or(DecryptError::UnknownKey(KeyId(id)))?;
    let nonce = *Nonce::from_slice(&buffer[MAGIC.len() + KEY_ID_LEN..HEADER_LEN]);
    buffer.drain(..HEADER_LEN);
    let aad = associated_data(model, version);
    key.cipher()
        .decrypt_in_place(&nonce, aad.as_bytes(), &mut *buffer)
        .map_err(|_| DecryptError::Authentication(aad))?;
    Ok(PlaintextModel(Arc::new(buffer)))
}

/// Reads and decrypts the encrypted model file at `path`.
pub fn decrypt_model_file(
    keys: &KeyRing,
    path: &Path,
    model: &str,
    version: i64,
) -> Result<PlaintextModel, DecryptError> {
    let file = std::fs::read(path).map_err(|e| DecryptError::Read(e.to_string()))?;
    decrypt_model(keys, file, model, version)
}

/// Encrypts `plaintext` for `model` version `version` with a fresh random nonce.
pub fn encrypt_model(key: &ModelKey, plaintext: &[u8], model: &str, version: i64) -> Vec<u8> {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    encrypt_model_with_nonce(key, plaintext, model, version, nonce.into())
}

/// Encrypts with a given nonce (a nonce must never repeat under one key: callers outside tests use
/// [`encrypt_model`]).
pub fn encrypt_model_with_nonce(
    key: &ModelKey,
    plaintext: &[u8],
    model: &str,
    version: i64,
    nonce: [u8; NONCE_LEN],
) -> Vec<u8> {
    let aad = associated_data(model, version);
    let payload = Payload {
        msg: plaintext,
        aad: aad.as_bytes(),
    };
    // AES-GCM encryption fails only for messages beyond 64 GiB, which no model file reaches.
    let sealed = key
        .cipher()
        .encrypt(Nonce::from_slice(&nonce), payload)
        .unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&key.id().0);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> ModelKey {
        ModelKey::from_bytes([byte; 32])
    }

    #[test]
    fn round_trip_with_the_right_key_and_place() {
        let ring = KeyRing::new(vec![key(1), key(2)]);
        let sealed = encrypt_model(&key(2), b"onnx graph", "m", 3);
        assert_eq!(&sealed[..8], MAGIC);
        assert_eq!(sealed.len(), HEADER_LEN + b"onnx graph".len() + TAG_LEN);
        let plain = decrypt_model(&ring, sealed, "m", 3).unwrap();
        assert_eq!(plain.bytes(), b"onnx graph");
        assert_eq!(format!("{plain:?}"), "PlaintextModel(10 bytes)");
    }

    #[test]
    fn the_key_id_is_the_sha256_prefix() {
        // SHA-256 of 32 zero bytes starts 66687aadf862bd77.
        assert_eq!(key(0).id().to_string(), "66687aadf862bd77");
    }

    #[test]
    fn matches_an_independent_implementation() {
        // From Python's cryptography AESGCM: key 32 x 0x01, nonce 12 x 0x02, plaintext "hello",
        // aad "m/1"; the key id is sha256(key)[:8].
        let expected_body = "6fb3a525251b24047360d1485898915914e9dd49dc";
        let sealed = encrypt_model_with_nonce(&key(1), b"hello", "m", 1, [2; 12]);
        let body: String = sealed[HEADER_LEN..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(body, expected_body);
        assert_eq!(key(1).id().to_string(), "72cd6e8422c407fb");
        assert_eq!(&sealed[8..16], &key(1).id().0);
        assert_eq!(&sealed[16..28], &[2; 12]);
        let ring = KeyRing::new(vec![key(1)]);
        assert_eq!(
            decrypt_model(&ring, sealed, "m", 1).unwrap().bytes(),
            b"hello"
        );
    }

    #[test]
    fn failures_say_why() {
        let ring = KeyRing::new(vec![key(1)]);
        let sealed = encrypt_model(&key(1), b"graph bytes", "m", 1);
        assert_eq!(
            decrypt_model(&ring, sealed.clone(), "other", 1),
            Err(DecryptError::Authentication("other/1".into()))
        );
        assert_eq!(
            decrypt_model(&ring, sealed.clone(), "m", 2),
            Err(DecryptError::Authentication("m/2".into()))
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            decrypt_model(&ring, tampered, "m", 1),
            Err(DecryptError::Authentication(_))
        ));
        let other = KeyRing::new(vec![key(9)]);
        let error = decrypt_model(&other, sealed.clone(), "m", 1).unwrap_err();
        assert_eq!(error, DecryptError::UnknownKey(key(1).id()));
        assert!(error.to_string().contains(&key(1).id().to_string()));
        let mut magic = sealed;
        magic[0] = b'X';
        assert_eq!(
            decrypt_model(&ring, magic, "m", 1),
            Err(DecryptError::BadMagic)
        );
        assert_eq!(
            decrypt_model(&ring, vec![0; 10], "m", 1),
            Err(DecryptError::TooShort(10))
        );
    }

    #[test]
    fn key_files_raw_or_hex() {
        let hex = "0101010101010101010101010101010101010101010101010101010101010101";
        assert_eq!(ModelKey::parse(hex.as_bytes()).unwrap().id(), key(1).id());
        assert_eq!(
            ModelKey::parse(format!("  {}\n", hex.to_uppercase()).as_bytes())
                .unwrap()
                .id(),
            key(1).id()
        );
        assert_eq!(ModelKey::parse(&[1; 32]).unwrap().id(), key(1).id());
        // A raw key may itself hold whitespace bytes: exactly 32 bytes are always raw.
        assert_eq!(ModelKey::parse(&[b' '; 32]).unwrap().id(), key(b' ').id());
        let mut with_newline = vec![7u8; 32];
        with_newline.push(b'\n');
        assert_eq!(ModelKey::parse(&with_newline).unwrap().id(), key(7).id());
        assert_eq!(ModelKey::parse(b"short").unwrap_err(), KeyError::Length(5));
        let not_hex = "zz".repeat(32);
        assert_eq!(
            ModelKey::parse(not_hex.as_bytes()).unwrap_err(),
            KeyError::NotHex
        );
        assert!(!format!("{:?}", key(1)).contains("0101"));
    }
}
