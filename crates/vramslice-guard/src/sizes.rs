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

/// `CUDA_ARRAY3D_LAYERED`: the depth counts layers.
const ARRAY3D_LAYERED: u32 = 0x01;
/// `CUDA_ARRAY3D_CUBEMAP`: the depth counts faces (6, or 6 × layers).
const ARRAY3D_CUBEMAP: u32 = 0x04;

/// Bytes of a mipmapped array: every level halves width and height, and the depth too unless
/// it counts layers or cube faces (`flags` has `CUDA_ARRAY3D_LAYERED` or `_CUBEMAP`), which
/// every level has in full.
pub fn mipmapped_bytes(
    width: u64,
    height: u64,
    depth: u64,
    format: i32,
    channels: u32,
    levels: u32,
    flags: u32,
) -> u64 {
    let depth_is_layers = flags & (ARRAY3D_LAYERED | ARRAY3D_CUBEMAP) != 0;
    (0..levels.clamp(1, 64)).fold(0u64, |acc, l| {
        let shrink = |v: u64| if v == 0 { 0 } else { dim(v >> l) };
        let level_depth = if depth_is_layers {
            depth
        } else {
            shrink(depth)
        };
        acc.saturating_add(array_bytes(
            shrink(width),
            shrink(height),
            level_depth,
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
        assert_eq!(mipmapped_bytes(8, 8, 0, 0x01, 1, 4, 0), 64 + 16 + 4 + 1);
        assert_eq!(mipmapped_bytes(8, 0, 0, 0x01, 1, 0, 0), 8);
        // A 3D array's depth halves with each level...
        assert_eq!(mipmapped_bytes(8, 8, 8, 0x01, 1, 4, 0), 512 + 64 + 8 + 1);
        // ...a layered one's 4 layers and a cubemap's 6 faces do not.
        assert_eq!(
            mipmapped_bytes(8, 8, 4, 0x01, 1, 4, ARRAY3D_LAYERED),
            (64 + 16 + 4 + 1) * 4
        );
        assert_eq!(
            mipmapped_bytes(8, 8, 6, 0x01, 1, 4, ARRAY3D_CUBEMAP),
            (64 + 16 + 4 + 1) * 6
        );
        assert_eq!(
            mipmapped_bytes(8, 8, 12, 0x01, 1, 2, ARRAY3D_CUBEMAP | ARRAY3D_LAYERED),
            (64 + 16) * 12
        );
    }
}
