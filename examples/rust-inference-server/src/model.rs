//! A small deterministic model: `layers` dense layers of width `dim` with ReLU, weights from a
//! fixed-seed generator (no download, identical on every machine), and its CPU forward pass.

/// Model shape and seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Width of every layer.
    pub dim: usize,
    /// Number of dense layers.
    pub layers: usize,
    /// Weight generator seed.
    pub seed: u64,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            dim: 512,
            layers: 8,
            seed: 7,
        }
    }
}

/// The weights, on the host.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Shape.
    pub spec: ModelSpec,
    /// Per layer: `dim × dim` row-major (output row, input column).
    pub w: Vec<Vec<f32>>,
    /// Per layer: `dim` biases.
    pub b: Vec<Vec<f32>>,
}

/// SplitMix64, mapped to floats in [-scale, scale).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn next_f32(&mut self, scale: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * scale
    }
}

impl Weights {
    /// Generate the weights of `spec`.
    pub fn generate(spec: ModelSpec) -> Self {
        let mut rng = Rng(spec.seed);
        let scale = (2.0 / spec.dim as f32).sqrt();
        let w = (0..spec.layers)
            .map(|_| {
                (0..spec.dim * spec.dim)
                    .map(|_| rng.next_f32(scale))
                    .collect()
            })
            .collect();
        let b = (0..spec.layers)
            .map(|_| (0..spec.dim).map(|_| rng.next_f32(0.01)).collect())
            .collect();
        Self { spec, w, b }
    }

    /// Bytes the weights occupy on a device.
    pub fn bytes(&self) -> u64 {
        let d = self.spec.dim as u64;
        self.spec.layers as u64 * (d * d + d) * 4
    }
}

/// A deterministic input batch: `batch × dim` floats from `seed`.
pub fn input(spec: &ModelSpec, batch: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed ^ 0x5eed);
    (0..batch * spec.dim).map(|_| rng.next_f32(1.0)).collect()
}

/// The forward pass on the CPU: returns `batch × dim` outputs.
pub fn forward_cpu(weights: &Weights, x: &[f32]) -> Vec<f32> {
    let d = weights.spec.dim;
    let mut cur = x.to_vec();
    let mut next = vec![0.0f32; cur.len()];
    for (w, b) in weights.w.iter().zip(&weights.b) {
        for (row_in, row_out) in cur.chunks_exact(d).zip(next.chunks_exact_mut(d)) {
            for (j, out) in row_out.iter_mut().enumerate() {
                let wr = &w[j * d..(j + 1) * d];
                let s: f32 = wr.iter().zip(row_in).map(|(a, b)| a * b).sum();
                *out = (s + b[j]).max(0.0);
            }
        }
        std::mem::swap(&mut cur, &mut next);
    }
    cur
}

/// A short, order-sensitive digest of outputs for responses and cross-device checks.
pub fn checksum(y: &[f32]) -> f64 {
    y.iter()
        .enumerate()
        .map(|(i, v)| f64::from(*v) * (1.0 + (i % 7) as f64))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_deterministic() {
        let spec = ModelSpec {
            dim: 8,
            layers: 2,
            seed: 1,
        };
        let a = Weights::generate(spec);
        let b = Weights::generate(spec);
        assert_eq!(a.w, b.w);
        assert_eq!(a.bytes(), 2 * (64 + 8) * 4);
        let y = forward_cpu(&a, &input(&spec, 3, 9));
        assert_eq!(y.len(), 24);
        assert!(y.iter().all(|v| *v >= 0.0));
        assert_eq!(
            checksum(&y),
            checksum(&forward_cpu(&b, &input(&spec, 3, 9)))
        );
    }
}
