//! Counting helpers: a growable bitmap of sequence numbers and percentiles.

use serde_json::{json, Value};

/// A set of sequence numbers (seq starts at 1 and is dense per conversation).
#[derive(Clone, Debug, Default)]
pub struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    /// Add `seq`; `true` if it was not there yet.
    pub fn set(&mut self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1 + w / 4, 0);
        }
        let had = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        !had
    }

    pub fn get(&self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        self.words.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    /// Add every member of `other`.
    pub fn union_with(&mut self, other: &Bitmap) {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// How many members of `self` are not in `other`.
    pub fn count_missing_from(&self, other: &Bitmap) -> u64 {
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| (w & !other.words.get(i).copied().unwrap_or(0)).count_ones() as u64)
            .sum()
    }
}

/// Percentiles of samples in microseconds, reported in milliseconds.
pub fn summary_ms(samples: &mut [u32]) -> Value {
    if samples.is_empty() {
        return json!({"n": 0});
    }
    samples.sort_unstable();
    let n = samples.len();
    let at = |q: f64| -> f64 {
        let idx = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        ms(samples[idx])
    };
    let mean = samples.iter().map(|&v| v as f64).sum::<f64>() / n as f64 / 1000.0;
    json!({
        "n": n,
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": ms(samples[n - 1]),
        "mean": (mean * 1000.0).round() / 1000.0,
    })
}

fn ms(us: u32) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// Median of a few values (None when empty).
pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_counts_missing() {
        let mut sent = Bitmap::default();
        let mut got = Bitmap::default();
        for s in 1..=200 {
            assert!(sent.set(s));
        }
        for s in (1..=200).filter(|s| s % 7 != 0) {
            got.set(s);
        }
        assert!(!sent.set(5));
        assert_eq!(sent.count_missing_from(&got), 28);
        assert!(got.get(1) && !got.get(7) && !got.get(100_000));
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<u32> = (1..=1000).map(|x| x * 1000).collect();
        let s = summary_ms(&mut v);
        assert_eq!(s["p50"], 500.0);
        assert_eq!(s["p99"], 990.0);
        assert_eq!(s["max"], 1000.0);
    }
}
