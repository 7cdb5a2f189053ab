//! The Open Inference Protocol's tensor datatypes (`FP32`, `INT64`,
//! `BYTES`, …) and how they map to Cascade's tensor types and to the
//! element types the registry records for a model's inputs and outputs.

use crate::bindings::TensorType;

/// The OIP datatype of a Cascade tensor type.
pub fn of_tensor_type(ty: TensorType) -> &'static str {
    match ty {
        TensorType::Fp16 => "FP16",
        TensorType::Fp32 => "FP32",
        TensorType::Fp64 => "FP64",
        TensorType::Bf16 => "BF16",
        TensorType::U8 => "UINT8",
        TensorType::I32 => "INT32",
        TensorType::I64 => "INT64",
    }
}

/// The Cascade tensor type of an OIP datatype, when there is one.
pub fn tensor_type(datatype: &str) -> Option<TensorType> {
    Some(match datatype {
        "FP16" => TensorType::Fp16,
        "FP32" => TensorType::Fp32,
        "FP64" => TensorType::Fp64,
        "BF16" => TensorType::Bf16,
        "UINT8" => TensorType::U8,
        "INT32" => TensorType::I32,
        "INT64" => TensorType::I64,
        _ => return None,
    })
}

/// The OIP datatype of an element type as the registry records it
/// (tract's names: `f32`, `i64`, `bool`, …).
pub fn of_model_type(ty: &str) -> &'static str {
    match ty {
        "f16" => "FP16",
        "f32" => "FP32",
        "f64" => "FP64",
        "bf16" => "BF16",
        "u8" => "UINT8",
        "u16" => "UINT16",
        "u32" => "UINT32",
        "u64" => "UINT64",
        "i8" => "INT8",
        "i16" => "INT16",
        "i32" => "INT32",
        "i64" => "INT64",
        "bool" => "BOOL",
        _ => "BYTES",
    }
}

/// Bytes of one element of `datatype` in the binary form; `None` for
/// `BYTES` (each element carries its own length) and unknown names.
pub fn element_size(datatype: &str) -> Option<usize> {
    Some(match datatype {
        "BOOL" | "UINT8" | "INT8" => 1,
        "FP16" | "BF16" | "UINT16" | "INT16" => 2,
        "FP32" | "UINT32" | "INT32" => 4,
        "FP64" | "UINT64" | "INT64" => 8,
        _ => return None,
    })
}

/// The datatypes the protocol defines.
pub const KNOWN: &[&str] = &[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
    "FP32", "FP64", "BF16", "BYTES",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cascade_type_has_a_datatype_and_back() {
        for ty in [
            TensorType::Fp16,
            TensorType::Fp32,
            TensorType::Fp64,
            TensorType::Bf16,
            TensorType::U8,
            TensorType::I32,
            TensorType::I64,
        ] {
            let datatype = of_tensor_type(ty);
            assert_eq!(tensor_type(datatype), Some(ty));
            assert!(KNOWN.contains(&datatype));
            assert_eq!(
                element_size(datatype),
                Some(crate::model::tensors::element_bytes(ty))
            );
        }
        assert_eq!(tensor_type("BOOL"), None);
        assert_eq!(of_model_type("i64"), "INT64");
        assert_eq!(element_size("BYTES"), None);
    }
}
