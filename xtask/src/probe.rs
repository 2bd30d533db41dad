//! Hardware ceilings measured in the same run: CPU memory bandwidth (streaming read and copy
//! on every core) and, on a GPU machine, what the GPU probes report.

use std::time::Instant;

/// CPU memory bandwidth, GB/s (1e9 bytes per second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuBandwidth {
    /// Streaming read (sum of u64 words), all threads together: bytes read per second.
    pub read_gbs: f64,
    /// Copy (`copy_from_slice`), all threads together: bytes read + written per second.
    pub copy_gbs: f64,
    /// Threads used.
    pub threads: usize,
    /// Buffer size per direction, bytes.
    pub bytes: usize,
}

/// Measures the streaming read and copy bandwidth over `bytes`-sized buffers (far larger than the
/// caches for a meaningful figure: 256 MiB by default), split over `threads` threads; the best of
/// `reps` repetitions (the ceiling is what the machine can do, so the best run is the estimate).
pub fn cpu_bandwidth(bytes: usize, threads: usize, reps: usize) -> CpuBandwidth {
    let threads = threads.max(1);
    let words = (bytes / 8).max(threads * 64);
    let src: Vec<u64> = (0..words as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9))
        .collect();
    let mut dst = vec![0u64; words];
    let chunk = words.div_ceil(threads);
    let mut best_read = 0f64;
    let mut best_copy = 0f64;
    let mut sink = 0u64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = src
                .chunks(chunk)
                .map(|c| s.spawn(move || read_sum(c)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
        });
        let dt = t.elapsed().as_secs_f64();
        sink = sink.wrapping_add(sums.iter().fold(0u64, |a, b| a.wrapping_add(*b)));
        best_read = best_read.max((words * 8) as f64 / dt / 1e9);

        let t = Instant::now();
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
        let dt = t.elapsed().as_secs_f64();
        best_copy = best_copy.max((2 * words * 8) as f64 / dt / 1e9);
        sink = sink.wrapping_add(std::hint::black_box(&dst)[words / 2]);
    }
    std::hint::black_box(sink);
    CpuBandwidth {
        read_gbs: best_read,
        copy_gbs: best_copy,
        threads,
        bytes: words * 8,
    }
}

/// Sum with four independent accumulators so the loop is bound by memory, not by the add chain.
fn read_sum(c: &[u64]) -> u64 {
    let mut a = [0u64; 4];
    let mut it = c.chunks_exact(4);
    for w in &mut it {
        a[0] = a[0].wrapping_add(w[0]);
        a[1] = a[1].wrapping_add(w[1]);
        a[2] = a[2].wrapping_add(w[2]);
        a[3] = a[3].wrapping_add(w[3]);
    }
    let tail = it.remainder().iter().fold(0u64, |x, y| x.wrapping_add(*y));
    a.iter().fold(tail, |x, y| x.wrapping_add(*y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_sum_is_the_sum() {
        let v: Vec<u64> = (0..1003).collect();
        assert_eq!(read_sum(&v), 1003 * 1002 / 2);
    }

    #[test]
    fn probe_gives_finite_positive_figures() {
        let b = cpu_bandwidth(1 << 20, 2, 2);
        assert!(b.read_gbs.is_finite() && b.read_gbs > 0.0);
        assert!(b.copy_gbs.is_finite() && b.copy_gbs > 0.0);
        assert_eq!(b.threads, 2);
        assert_eq!(b.bytes, 1 << 20);
    }
}
