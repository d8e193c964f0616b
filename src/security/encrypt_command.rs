//! `onnx-gateway encrypt-model`: writes the encrypted form of a model file for one model version,
//! in the format the gateway reads (see model_crypto.rs).
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use zeroize::Zeroizing;

use super::model_crypto::{encrypt_model, ModelKey};

/// Encrypt an ONNX model file for one model name and version (AES-256-GCM).
#[derive(Debug, Parser)]
#[command(
    name = "onnx-gateway encrypt-model",
    bin_name = "onnx-gateway encrypt-model"
)]
pub struct EncryptModelArgs {
    /// Key file: 32 raw bytes or 64 hex characters (the same file the gateway gets as --model-key-file).
    #[arg(long)]
    pub key_file: PathBuf,
    /// The model's name in the repository (the file only opens there).
    #[arg(long)]
    pub model_name: String,
    /// The version directory the file goes into (the file only opens there).
    #[arg(long)]
    pub version: i64,
    /// The plaintext ONNX file.
    pub input: PathBuf,
    /// Where to write the encrypted file, normally <repo>/<model>/<version>/model.onnx.enc.
    pub output: PathBuf,
}

/// The first argument that selects this command instead of serving.
pub const SUBCOMMAND: &str = "encrypt-model";

pub fn run(args: &EncryptModelArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.version > 0, "--version must be a positive integer");
    crate::model::repository::validate_model_name(&args.model_name)
        .map_err(|e| anyhow::anyhow!("--model-name: {e}"))?;
    let key_bytes = Zeroizing::new(
        std::fs::read(&args.key_file)
            .with_context(|| format!("cannot read --key-file {}", args.key_file.display()))?,
    );
    let key = ModelKey::parse(&key_bytes)
        .map_err(|e| anyhow::anyhow!("--key-file {}: {e}", args.key_file.display()))?;
    let plaintext = Zeroizing::new(
        std::fs::read(&args.input)
            .with_context(|| format!("cannot read {}", args.input.display()))?,
    );
    let sealed = encrypt_model(&key, &plaintext, &args.model_name, args.version);
    std::fs::write(&args.output, sealed)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    eprintln!(
        "wrote {} for model '{}' version {} with key id {}",
        args.output.display(),
        args.model_name,
        args.version,
        key.id()
    );
    Ok(())
}
