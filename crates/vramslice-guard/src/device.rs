//! Devices as the limits name them: a device's 16 UUID bytes (what `cuDeviceGetUuid` returns)
//! written as NVIDIA writes them, `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in lowercase hex —
//! the form `nvidia-smi -L`, NVML and the device plugin use.

/// The UUID of a device from its 16 bytes, formatted as NVIDIA does.
pub fn format_gpu_uuid(bytes: &[u8; 16]) -> String {
    let mut out = String::with_capacity(40);
    out.push_str("GPU-");
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_as_nvidia_does() {
        let bytes = [
            0xe9, 0x1e, 0xdf, 0x3b, 0xb2, 0x97, 0x37, 0xc1, 0xa2, 0xa7, 0x76, 0x01, 0xc3, 0x23,
            0x8f, 0xa2,
        ];
        assert_eq!(
            format_gpu_uuid(&bytes),
            "GPU-e91edf3b-b297-37c1-a2a7-7601c3238fa2"
        );
        assert_eq!(
            format_gpu_uuid(&[0; 16]),
            "GPU-00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(format_gpu_uuid(&[0xff; 16]).len(), 40);
    }
}
