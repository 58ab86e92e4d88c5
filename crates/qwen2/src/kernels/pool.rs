//! One thread pool for all kernels, never larger than the physical core count: a compute thread more
//! than there are cores makes every parallel step wait for the slowest, descheduled one.

use std::sync::OnceLock;

static THREADS: OnceLock<usize> = OnceLock::new();

/// Sets the number of compute threads (once, before the first kernel runs). `None` = physical cores.
pub fn init(threads: Option<usize>) -> usize {
    *THREADS.get_or_init(|| {
        let n = threads.unwrap_or_else(physical_cores).max(1);
        // An error here means the global pool was already built (e.g. by a test harness); keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
        n
    })
}

pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Physical cores from /proc/cpuinfo (core ids per physical package); falls back to logical CPUs.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::HashSet::new();
    let mut phys = String::new();
    for line in info.lines() {
        if let Some(v) = line.strip_prefix("physical id") {
            phys = v.trim_start_matches([' ', '\t', ':']).to_string();
        } else if let Some(v) = line.strip_prefix("core id") {
            cores.insert((
                phys.clone(),
                v.trim_start_matches([' ', '\t', ':']).to_string(),
            ));
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

/// Runs `f` on a thread of the compute pool and returns its result.
///
/// Parallel kernels called from inside the pool hand work to the other threads directly; called from
/// outside it (the main thread), each one also pays for waking the pool and then the caller — 17-30 µs
/// per call measured on a 2-core VM, against ~0.1 µs from inside. A decode step makes ~170 such calls,
/// so wrapping a whole forward pass (or generation loop) in `install` saves milliseconds per token.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // `scope` runs its closure on a worker of the current (here: global) pool, injecting it there when
    // called from outside.
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    #[test]
    fn install_runs_on_a_pool_thread() {
        assert!(rayon::current_thread_index().is_none());
        let inside = super::install(|| rayon::current_thread_index().is_some());
        assert!(inside);
    }
}
