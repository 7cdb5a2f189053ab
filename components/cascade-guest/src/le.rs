//! Little-endian tensor payloads, as the WIT `tensor.data` field carries them.

use crate::Failure;

/// Decodes `bytes` as `f32`s, refusing a length that is not a whole number of elements.
pub fn f32s(name: &str, bytes: &[u8]) -> Result<Vec<f32>, Failure> {
    decode(name, bytes, f32::from_le_bytes)
}

/// Decodes `bytes` as `i64`s.
pub fn i64s(name: &str, bytes: &[u8]) -> Result<Vec<i64>, Failure> {
    decode(name, bytes, i64::from_le_bytes)
}

/// Decodes `bytes` as `i32`s.
pub fn i32s(name: &str, bytes: &[u8]) -> Result<Vec<i32>, Failure> {
    decode(name, bytes, i32::from_le_bytes)
}

/// Encodes `f32`s.
pub fn from_f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Encodes `i64`s.
pub fn from_i64s(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode<const N: usize, T>(
    name: &str,
    bytes: &[u8],
    from: fn([u8; N]) -> T,
) -> Result<Vec<T>, Failure> {
    let chunks = bytes.chunks_exact(N);
    if !chunks.remainder().is_empty() {
        return Err(Failure::input(format!(
            "tensor `{name}`: {} bytes is not a whole number of {N}-byte elements",
            bytes.len()
        )));
    }
    Ok(chunks
        .map(|c| from(c.try_into().expect("chunks_exact yields N bytes")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_ragged_length() {
        assert_eq!(
            f32s("x", &from_f32s(&[1.5, -2.0])).unwrap(),
            vec![1.5, -2.0]
        );
        assert_eq!(i64s("x", &from_i64s(&[7, -1])).unwrap(), vec![7, -1]);
        assert!(f32s("x", &[0, 0, 0]).is_err());
    }
}
