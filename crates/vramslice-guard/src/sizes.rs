//! Bytes a CUDA array takes, from its descriptor (the logical size: the driver may pad more).

/// Bytes of one channel of a `CUarray_format`; unknown formats count 4.
pub fn format_bytes(format: i32) -> u64 {
    match format {
        0x01 | 0x08 => 1,        // (UN)SIGNED_INT8
        0x02 | 0x09 | 0x10 => 2, // (UN)SIGNED_INT16, HALF
        _ => 4,                  // INT32, FLOAT and anything newer
    }
}

fn dim(v: u64) -> u64 {
    v.max(1)
}

/// Bytes of a 1-3D array (a zero dimension counts as 1), saturating.
pub fn array_bytes(width: u64, height: u64, depth: u64, format: i32, channels: u32) -> u64 {
    dim(width)
        .saturating_mul(dim(height))
        .saturating_mul(dim(depth))
        .saturating_mul(format_bytes(format))
        .saturating_mul(u64::from(channels.max(1)))
}

/// Bytes of a mipmapped array: every level halves each non-zero dimension.
pub fn mipmapped_bytes(
    width: u64,
    height: u64,
    depth: u64,
    format: i32,
    channels: u32,
    levels: u32,
) -> u64 {
    (0..levels.clamp(1, 64)).fold(0u64, |acc, l| {
        let shrink = |v: u64| if v == 0 { 0 } else { dim(v >> l) };
        acc.saturating_add(array_bytes(
            shrink(width),
            shrink(height),
            shrink(depth),
            format,
            channels,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_sizes() {
        assert_eq!(array_bytes(100, 0, 0, 0x20, 4), 1600);
        assert_eq!(array_bytes(10, 10, 10, 0x01, 1), 1000);
        assert_eq!(array_bytes(u64::MAX, 2, 1, 0x20, 1), u64::MAX);
        assert_eq!(mipmapped_bytes(8, 8, 0, 0x01, 1, 4), 64 + 16 + 4 + 1);
        assert_eq!(mipmapped_bytes(8, 0, 0, 0x01, 1, 0), 8);
    }
}
