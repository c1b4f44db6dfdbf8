//! A fast, non-cryptographic hash for the ledger's maps (the Fx hash of rustc and Firefox).
//!
//! Keys are node names and pod UIDs written by the cluster's own components, not by untrusted
//! clients, so hash flooding is not a concern; lookups of 5,000 node names per filter call are.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map keyed by `String` with [`FxHasher`].
pub(crate) type FastMap<V> = HashMap<String, V, BuildHasherDefault<FxHasher>>;

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

/// The Fx hasher: rotate, xor, multiply, one word at a time.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
        // Mix in the length so zero padding cannot make "a" and "a\0" collide.
        self.add(bytes.len() as u64);
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, BuildHasherDefault};

    #[test]
    fn equal_keys_hash_equal_and_neighbours_differ() {
        let build = BuildHasherDefault::<FxHasher>::default();
        assert_eq!(
            build.hash_one("gpu-node-00001"),
            build.hash_one("gpu-node-00001")
        );
        assert_ne!(
            build.hash_one("gpu-node-00001"),
            build.hash_one("gpu-node-00002")
        );
        assert_ne!(build.hash_one("a"), build.hash_one("a\0"));
        let mut map: FastMap<u32> = FastMap::default();
        for i in 0..1000 {
            map.insert(format!("node-{i}"), i);
        }
        assert!((0..1000).all(|i| map.get(&format!("node-{i}")) == Some(&i)));
    }
}
