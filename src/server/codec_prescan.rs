//! A walk over a ModelInferRequest's protobuf wire bytes that allocates nothing: it reads tags and
//! lengths, counts every input's typed elements and reads its declared shape, so that a request
//! whose contents cannot match its shape is refused before prost builds one object per element.
//!
//! The walk is lenient where prost is strict about things that cost no memory (UTF-8 of strings,
//! the insides of parameters): those requests pass the walk and prost refuses them as before. It
//! calls a message malformed only where prost refuses it too (a bad varint or key, a length past
//! the end, a wrong wire type for a known field, an unmatched group), so whatever prost accepts
//! the walk has checked; `tests` compare the two on random and mutated messages.
use crate::tensor::names::shown;
use crate::tensor::DataType;

/// The most dimensions an input's shape may have (numpy's limit; ONNX models use far fewer).
pub const MAX_DIMS: usize = 64;
/// The most inputs, and separately the most requested outputs, one request may name.
pub const MAX_TENSORS: u64 = 4096;
/// The most parameters (request, input and output maps together) one request may carry.
pub const MAX_PARAMETERS: u64 = 4096;

/// prost refuses groups nested 100 deep; the walk stops one level later, so whenever it calls a
/// message malformed for its depth, prost did too.
const MAX_GROUP_DEPTH: u32 = 101;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const DELIMITED: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// The typed fields of InferTensorContents, in field-number order (1..=8).
pub const TYPED_FIELDS: [&str; 8] = [
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
];

/// What the walk counted: what prost's decoding will allocate objects for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestScan {
    pub inputs: u64,
    pub outputs: u64,
    pub raw_contents: u64,
    /// Map entries of the request, its inputs and its outputs.
    pub parameters: u64,
    /// Shape dimensions of all inputs.
    pub dims: u64,
    /// Elements of each typed field (index = field number - 1), over all inputs.
    pub typed: [u64; 8],
}

/// Why the walk did not pass a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanError {
    /// Well-formed enough to read, but decode_request would refuse it (or it passes a bound of the
    /// walk's own): INVALID_ARGUMENT with this text.
    Refused(String),
    /// Not a protobuf message prost would accept: prost decodes it and reports its error.
    Malformed,
}

use ScanError::{Malformed, Refused};

/// Walks a ModelInferRequest's wire bytes.
pub fn scan_request(buf: &[u8]) -> Result<RequestScan, ScanError> {
    let mut wire = Wire(buf);
    let mut scan = RequestScan::default();
    let mut model_name: &[u8] = b"";
    let mut inline_inputs = 0u64;
    while !wire.0.is_empty() {
        let (tag, wire_type) = wire.key()?;
        match tag {
            1 => model_name = wire.delimited_field(wire_type)?,
            2 | 3 => drop(wire.delimited_field(wire_type)?),
            4 => {
                wire.delimited_field(wire_type)?;
                scan.parameters += 1;
            }
            5 => {
                let input = scan_input(wire.delimited_field(wire_type)?, &mut scan)?;
                inline_inputs += u64::from(!input.in_shm);
                scan.inputs += 1;
                input.check()?;
            }
            6 => {
                scan_output(wire.delimited_field(wire_type)?, &mut scan)?;
                scan.outputs += 1;
            }
            7 => {
                wire.delimited_field(wire_type)?;
                scan.raw_contents += 1;
            }
            _ => wire.skip(wire_type, tag, 0)?,
        }
        check_bounds(&scan)?;
    }
    if scan.raw_contents > inline_inputs {
        return Err(Refused(format!(
            "expected {inline_inputs} raw_input_contents (one per input not in shared memory) but got {} for model '{}'",
            scan.raw_contents,
            shown(&String::from_utf8_lossy(model_name))
        )));
    }
    Ok(scan)
}

fn check_bounds(scan: &RequestScan) -> Result<(), ScanError> {
    let over =
        |what: &str, bound: u64| Refused(format!("a request may name at most {bound} {what}"));
    if scan.inputs > MAX_TENSORS {
        return Err(over("inputs", MAX_TENSORS));
    }
    if scan.outputs > MAX_TENSORS {
        return Err(over("outputs", MAX_TENSORS));
    }
    if scan.parameters > MAX_PARAMETERS {
        return Err(over("parameters", MAX_PARAMETERS));
    }
    Ok(())
}

/// One InferInputTensor as the walk saw it; the slices point into the message.
struct InputScan<'a> {
    name: &'a [u8],
    datatype: &'a [u8],
    /// The first [`MAX_DIMS`] dimensions; `rank` counts them all.
    dims: [i64; MAX_DIMS],
    rank: usize,
    typed: [u64; 8],
    in_shm: bool,
}

fn scan_input<'a>(buf: &'a [u8], scan: &mut RequestScan) -> Result<InputScan<'a>, ScanError> {
    let mut input = InputScan {
        name: b"",
        datatype: b"",
        dims: [0; MAX_DIMS],
        rank: 0,
        typed: [0; 8],
        in_shm: false,
    };
    let mut wire = Wire(buf);
    while !wire.0.is_empty() {
        let (tag, wire_type) = wire.key()?;
        match tag {
            1 => input.name = wire.delimited_field(wire_type)?,
            2 => input.datatype = wire.delimited_field(wire_type)?,
            3 => scan_shape(&mut wire, wire_type, &mut input)?,
            4 => {
                let entry = wire.delimited_field(wire_type)?;
                input.in_shm |= map_key(entry) == Some(b"shared_memory_region".as_slice());
                scan.parameters += 1;
            }
            5 => scan_contents(wire.delimited_field(wire_type)?, &mut input.typed)?,
            _ => wire.skip(wire_type, tag, 0)?,
        }
    }
    scan.dims += input.rank as u64;
    for (total, count) in scan.typed.iter_mut().zip(input.typed) {
        *total += count;
    }
    Ok(input)
}

/// `repeated int64 shape`: packed, or one varint per field.
fn scan_shape(
    wire: &mut Wire<'_>,
    wire_type: u8,
    input: &mut InputScan<'_>,
) -> Result<(), ScanError> {
    let mut push = |value: u64| {
        if let Some(slot) = input.dims.get_mut(input.rank) {
            *slot = value as i64;
        }
        input.rank += 1;
    };
    match wire_type {
        VARINT => push(wire.varint()?),
        DELIMITED => {
            let mut packed = Wire(wire.delimited()?);
            while !packed.0.is_empty() {
                push(packed.varint()?);
            }
        }
        _ => return Err(Malformed),
    }
    Ok(())
}

/// InferTensorContents: adds the elements of each typed field to `typed`.
fn scan_contents(buf: &[u8], typed: &mut [u64; 8]) -> Result<(), ScanError> {
    let mut wire = Wire(buf);
    while !wire.0.is_empty() {
        let (tag, wire_type) = wire.key()?;
        let count = match (tag, wire_type) {
            (1..=5, VARINT) => wire.varint().map(|_| 1)?,
            (1..=5, DELIMITED) => count_varints(wire.delimited()?)?,
            (6, FIXED32) => wire.take(4).map(|_| 1)?,
            (7, FIXED64) => wire.take(8).map(|_| 1)?,
            (6, DELIMITED) => fixed_count(wire.delimited()?, 4)?,
            (7, DELIMITED) => fixed_count(wire.delimited()?, 8)?,
            (8, DELIMITED) => wire.delimited().map(|_| 1)?,
            (1..=8, _) => return Err(Malformed),
            _ => {
                wire.skip(wire_type, tag, 0)?;
                continue;
            }
        };
        typed[tag as usize - 1] += count;
    }
    Ok(())
}

fn count_varints(buf: &[u8]) -> Result<u64, ScanError> {
    let mut packed = Wire(buf);
    let mut count = 0;
    while !packed.0.is_empty() {
        packed.varint()?;
        count += 1;
    }
    Ok(count)
}

fn fixed_count(buf: &[u8], width: usize) -> Result<u64, ScanError> {
    if !buf.len().is_multiple_of(width) {
        return Err(Malformed);
    }
    Ok((buf.len() / width) as u64)
}

/// InferRequestedOutputTensor: only its parameters are counted.
fn scan_output(buf: &[u8], scan: &mut RequestScan) -> Result<(), ScanError> {
    let mut wire = Wire(buf);
    while !wire.0.is_empty() {
        let (tag, wire_type) = wire.key()?;
        match tag {
            1 => drop(wire.delimited_field(wire_type)?),
            2 => {
                wire.delimited_field(wire_type)?;
                scan.parameters += 1;
            }
            _ => wire.skip(wire_type, tag, 0)?,
        }
    }
    Ok(())
}

/// The key of a map entry (field 1; the last one wins, as in prost), or None when the entry cannot
/// be read (prost then refuses the message).
fn map_key(entry: &[u8]) -> Option<&[u8]> {
    let mut wire = Wire(entry);
    let mut key: &[u8] = b"";
    while !wire.0.is_empty() {
        let (tag, wire_type) = wire.key().ok()?;
        match tag {
            1 => key = wire.delimited_field(wire_type).ok()?,
            _ => wire.skip(wire_type, tag, 0).ok()?,
        }
    }
    Some(key)
}

impl InputScan<'_> {
    /// The checks decode_request makes on typed contents, in its order and with its texts, done
    /// here before prost allocates the elements.
    fn check(&self) -> Result<(), ScanError> {
        let name = String::from_utf8_lossy(self.name);
        let name = shown(&name);
        if self.rank > MAX_DIMS {
            return Err(Refused(format!(
                "input '{name}' has a shape of {} dimensions; at most {MAX_DIMS} are accepted",
                self.rank
            )));
        }
        if self.typed.iter().all(|&n| n == 0) {
            return Ok(());
        }
        let datatype = String::from_utf8_lossy(self.datatype);
        let Some(dtype) = DataType::parse(&datatype) else {
            return Err(Refused(format!(
                "input '{name}' has unknown datatype '{}'",
                shown(&datatype)
            )));
        };
        let count = self.declared_count(&name.to_string())?;
        let Some(field) = typed_field(dtype) else {
            return Err(Refused(format!(
                "input '{name}': {dtype} data must be sent in raw_input_contents (the protocol has no typed field for it)"
            )));
        };
        if let Some(other) = (0..8).find(|&f| f != field && self.typed[f] > 0) {
            return Err(Refused(format!(
                "input '{name}' has {} elements in {}, which datatype {dtype} does not read (it reads {})",
                self.typed[other], TYPED_FIELDS[other], TYPED_FIELDS[field]
            )));
        }
        if self.typed[field] != count {
            return Err(Refused(format!(
                "input '{name}' has {} elements in its typed contents but its shape needs {count}",
                self.typed[field]
            )));
        }
        Ok(())
    }

    /// The shape's element count, refused as decode_request refuses it (negative, overflowing).
    fn declared_count(&self, name: &str) -> Result<u64, ScanError> {
        let dims = &self.dims[..self.rank];
        if dims.iter().any(|&d| d < 0) {
            return Err(Refused(format!(
                "input '{name}' has a negative dimension in shape {}",
                shown(&format!("{dims:?}"))
            )));
        }
        let count = dims
            .iter()
            .try_fold(1usize, |count, &d| count.checked_mul(d as usize));
        count.map(|c| c as u64).ok_or_else(|| {
            Refused(format!(
                "input '{name}': {}",
                crate::tensor::ShapeError::Overflow(dims.to_vec())
            ))
        })
    }
}

/// The InferTensorContents field (index) a datatype's typed values are read from.
pub fn typed_field(dtype: DataType) -> Option<usize> {
    Some(match dtype {
        DataType::Bool => 0,
        DataType::Int8 | DataType::Int16 | DataType::Int32 => 1,
        DataType::Int64 => 2,
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => 3,
        DataType::Uint64 => 4,
        DataType::Fp32 => 5,
        DataType::Fp64 => 6,
        DataType::Bytes => 7,
        DataType::Fp16 | DataType::Bf16 => return None,
    })
}

/// The unread rest of a message.
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    /// A varint as prost reads it: at most 10 bytes, the 10th below 2.
    fn varint(&mut self) -> Result<u64, ScanError> {
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().take(10).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                if i == 9 && byte >= 2 {
                    return Err(Malformed);
                }
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(Malformed)
    }

    fn key(&mut self) -> Result<(u32, u8), ScanError> {
        let key = self.varint()?;
        let key = u32::try_from(key).map_err(|_| Malformed)?;
        let (tag, wire_type) = (key >> 3, (key & 7) as u8);
        if tag == 0 || wire_type > FIXED32 {
            return Err(Malformed);
        }
        Ok((tag, wire_type))
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], ScanError> {
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.0.len())
            .ok_or(Malformed)?;
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }

    fn delimited(&mut self) -> Result<&'a [u8], ScanError> {
        let len = self.varint()?;
        self.take(len)
    }

    /// A known length-delimited field (string, bytes, message, map entry).
    fn delimited_field(&mut self, wire_type: u8) -> Result<&'a [u8], ScanError> {
        if wire_type != DELIMITED {
            return Err(Malformed);
        }
        self.delimited()
    }

    /// An unknown field, skipped as prost skips it.
    fn skip(&mut self, wire_type: u8, tag: u32, depth: u32) -> Result<(), ScanError> {
        match wire_type {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            DELIMITED => self.delimited().map(drop),
            FIXED32 => self.take(4).map(drop),
            START_GROUP => self.skip_group(tag, depth),
            _ => Err(Malformed),
        }
    }

    fn skip_group(&mut self, tag: u32, depth: u32) -> Result<(), ScanError> {
        if depth >= MAX_GROUP_DEPTH {
            return Err(Malformed);
        }
        loop {
            let (inner, wire_type) = self.key()?;
            if wire_type == END_GROUP {
                return if inner == tag { Ok(()) } else { Err(Malformed) };
            }
            self.skip(wire_type, inner, depth + 1)?;
        }
    }
}

#[cfg(test)]
#[path = "codec_prescan_tests.rs"]
mod tests;
