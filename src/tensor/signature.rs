//! The signature of a model graph as the runtime reports it: what the model domain validates configs
//! against and the runtime builds sessions from, so neither depends on the other for it.
use super::DataType;

/// One input or output of an ONNX graph as ONNX Runtime reports it: full dims including any batch
/// dimension, with -1 for a symbolic or unknown dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphTensor {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
}

/// The inputs and outputs of an ONNX graph.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GraphSignature {
    pub inputs: Vec<GraphTensor>,
    pub outputs: Vec<GraphTensor>,
}
