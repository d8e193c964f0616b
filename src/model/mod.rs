//! Model domain: Triton's ModelConfig (text-format parsing, auto-completion from the ONNX signature,
//! validation), the repository layout and version policy, and the set of loaded models.
//!
//! ModelConfig is the schema of `config.pbtxt` files, so this module uses the type generated from
//! proto/model_config.proto; the request/response messages of grpc_service.proto stay in `server`.
pub mod autocomplete;
pub mod bounds;
pub mod config_json;
pub mod config_text;
pub mod ignored;
pub mod instance_plan;
pub mod labels;
pub mod manager;
pub mod override_files;
pub mod poll;
pub mod repository;
pub mod validate;
pub mod warmup;

use crate::tensor::DataType;

pub use crate::proto::ModelConfig;
pub use validate::TensorSpec;

pub use crate::tensor::signature::{GraphSignature, GraphTensor};

/// Errors of the model domain: unreadable or invalid configs, repository problems.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{model}: config.pbtxt: {reason}")]
    ConfigParse { model: String, reason: String },
    #[error("{model}: invalid config: {reason}")]
    InvalidConfig { model: String, reason: String },
    #[error("{model}: {reason}")]
    Repository { model: String, reason: String },
    /// A name that could reach outside the repository (or no directory at all): refused as given.
    #[error("{model}: {reason}")]
    InvalidName { model: String, reason: String },
    /// No such model in the repository, or (unloading) none loaded under that name.
    #[error("{model}: {reason}")]
    NotFound { model: String, reason: String },
    /// An encrypted model file that cannot be opened: no key for it, a wrong key, altered or moved.
    #[error("{model}: {reason}")]
    Decryption { model: String, reason: String },
    /// The load ran past `--model-load-timeout-secs`; it stops building and installs nothing.
    #[error("{model}: the load did not finish within --model-load-timeout-secs ({seconds} s)")]
    LoadTimedOut { model: String, seconds: u64 },
    /// The load was stopped before it finished (the server is shutting down).
    #[error("{model}: load cancelled: {reason}")]
    LoadCancelled { model: String, reason: String },
}

/// Converts a config datatype (`TYPE_FP32`, ...) to the protocol datatype; None for TYPE_INVALID.
pub fn datatype_from_config(value: i32) -> Option<DataType> {
    use crate::proto::DataType as C;
    Some(match C::try_from(value).ok()? {
        C::TypeInvalid => return None,
        C::TypeBool => DataType::Bool,
        C::TypeUint8 => DataType::Uint8,
        C::TypeUint16 => DataType::Uint16,
        C::TypeUint32 => DataType::Uint32,
        C::TypeUint64 => DataType::Uint64,
        C::TypeInt8 => DataType::Int8,
        C::TypeInt16 => DataType::Int16,
        C::TypeInt32 => DataType::Int32,
        C::TypeInt64 => DataType::Int64,
        C::TypeFp16 => DataType::Fp16,
        C::TypeFp32 => DataType::Fp32,
        C::TypeFp64 => DataType::Fp64,
        C::TypeString => DataType::Bytes,
        C::TypeBf16 => DataType::Bf16,
    })
}

/// Converts a protocol datatype to the config enum value.
pub fn datatype_to_config(dtype: DataType) -> i32 {
    use crate::proto::DataType as C;
    (match dtype {
        DataType::Bool => C::TypeBool,
        DataType::Uint8 => C::TypeUint8,
        DataType::Uint16 => C::TypeUint16,
        DataType::Uint32 => C::TypeUint32,
        DataType::Uint64 => C::TypeUint64,
        DataType::Int8 => C::TypeInt8,
        DataType::Int16 => C::TypeInt16,
        DataType::Int32 => C::TypeInt32,
        DataType::Int64 => C::TypeInt64,
        DataType::Fp16 => C::TypeFp16,
        DataType::Fp32 => C::TypeFp32,
        DataType::Fp64 => C::TypeFp64,
        DataType::Bytes => C::TypeString,
        DataType::Bf16 => C::TypeBf16,
    }) as i32
}
