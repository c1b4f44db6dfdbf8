//! The stable identity of a job's profile: a key (model name) plus the parameters that change its
//! memory (batch size, sequence length, precision, …), hashed the same way in every process,
//! every language binding and every release.
//!
//! Canonical form (version 1), as bytes: the line `vramslice-profile-v1\n`, then the key, then
//! each parameter name and value in ascending byte order of the names, each item written as its
//! length in bytes in decimal, a colon, the UTF-8 bytes and a newline (`5:batch\n1:8\n`). The
//! length prefix makes the encoding unambiguous whatever the strings contain. The hash is 64-bit
//! FNV-1a (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`) of those bytes; the profile
//! file is named by the hash as 16 lowercase hex digits plus `.json`. The file also stores the key
//! and parameters, so a hash collision reads as a miss, never as another job's peak.

use std::collections::BTreeMap;

/// Version line that starts the canonical form.
pub const CANONICAL_PREFIX: &[u8] = b"vramslice-profile-v1\n";

/// The canonical byte form of `key` + `params` (see the module docs).
pub fn canonical(key: &str, params: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = CANONICAL_PREFIX.to_vec();
    let mut item = |s: &str| {
        out.extend_from_slice(s.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(s.as_bytes());
        out.push(b'\n');
    };
    item(key);
    for (name, value) in params {
        item(name);
        item(value);
    }
    out
}

/// 64-bit FNV-1a.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The profile hash of `key` + `params`.
pub fn profile_hash(key: &str, params: &BTreeMap<String, String>) -> u64 {
    fnv1a64(&canonical(key, params))
}

/// The profile file name of `key` + `params`: 16 hex digits and `.json`.
pub fn profile_file_name(key: &str, params: &BTreeMap<String, String>) -> String {
    format!("{:016x}.json", profile_hash(key, params))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fnv_matches_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn canonical_form_is_as_documented() {
        let c = canonical("whisper", &params(&[("seq", "448"), ("batch", "8")]));
        assert_eq!(
            c,
            b"vramslice-profile-v1\n7:whisper\n5:batch\n1:8\n3:seq\n3:448\n".to_vec()
        );
    }

    #[test]
    fn hash_is_pinned_across_releases() {
        // Other languages and older profile directories rely on this exact value.
        let h = profile_hash("whisper", &params(&[("batch", "8"), ("seq", "448")]));
        assert_eq!(h, 0xdc1f_d69a_4072_6c97);
        assert_eq!(profile_file_name("m", &BTreeMap::new()).len(), 21);
    }

    #[test]
    fn order_of_insertion_does_not_matter_but_content_does() {
        let a = profile_hash("m", &params(&[("a", "1"), ("b", "2")]));
        let b = profile_hash("m", &params(&[("b", "2"), ("a", "1")]));
        assert_eq!(a, b);
        // "a=1b" vs "a" "1b": length prefixes keep these apart.
        assert_ne!(
            profile_hash("m", &params(&[("a", "1\n1:b")])),
            profile_hash("m", &params(&[("a", "1"), ("b", "")]))
        );
        assert_ne!(
            profile_hash("m", &BTreeMap::new()),
            profile_hash("n", &BTreeMap::new())
        );
    }
}
