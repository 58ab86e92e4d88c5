//! One thread pool for all kernels, never larger than the physical core count: a compute thread more
//! than there are cores makes every parallel step wait for the slowest, descheduled one.
//!
//! Inside a forward pass ([`install`]) the pool's threads work as a team that spins between parallel
//! steps instead of sleeping, and the kernels split their work with [`for_each`],
//! [`for_each_chunk_mut`], [`for_each_item`] and [`for_each_run`].

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
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

/// Runs `f` on a thread of the compute pool, with the pool's other threads serving its parallel steps
/// (see `Team` below), and returns its result.
///
/// Why a team rather than plain rayon inside a forward pass: an idle rayon worker yields a few
/// dozen times and then sleeps, and on a 2-core VM waking it again took 53-65 µs on average (perf
/// sched). A decode step makes 121-193 parallel steps with short serial stretches between them, so
/// the process's threads slept 14-25 times per token between them and many steps began on one core.
/// Here, for the length of `f`, each other worker runs one job that waits for steps by spinning,
/// and the kernels hand their steps to it ([`for_each`] and friends; outside `install` they fall
/// back to rayon): 1.4-2.6 voluntary context switches per token, those between forward passes
/// (0.1-0.2 with one `install` around a whole loop of them, which decoded no faster), and decode
/// 1.08× (`--dtype q8_0`), 1.09× (BF16) and 1.10× (F32) as fast, medians of 6-8 pairs of
/// alternating processes.
///
/// Called from outside the pool, `install` also saves the hop onto it per kernel (17-30 µs per call on
/// a 2-core VM against ~0.1 µs from inside).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if !TEAM.with(|t| t.get().is_null()) {
        // Already leading a team (an `install` inside another, e.g. a caller wrapping several forward
        // passes): its helpers keep serving.
        return f();
    }
    // `scope` runs its closure on a worker of the global pool (injecting it there when called from
    // outside) and returns only when every job spawned in it has finished.
    let team = Team::default();
    let team = &team;
    rayon::scope(|s| {
        for _ in 1..threads() {
            s.spawn(move |_| team.serve());
        }
        let _lead = Lead::new(team);
        f()
    })
}

thread_local! {
    /// The team this thread leads, while it runs an `install`ed closure.
    static TEAM: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
    /// Set while this thread runs a task of its team's step: a parallel call from inside a task runs
    /// serially rather than start a second step.
    static IN_STEP: Cell<bool> = const { Cell::new(false) };
}

/// Makes the calling thread the leader of `team` for its lifetime; on drop (also when unwinding) ends
/// the team, so its helpers return and `scope` can finish.
struct Lead<'a>(&'a Team);

impl<'a> Lead<'a> {
    fn new(team: &'a Team) -> Self {
        TEAM.with(|t| t.set(team));
        Lead(team)
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        TEAM.with(|t| t.set(std::ptr::null()));
        self.0.finished.store(true, Ordering::Release);
    }
}

/// Bits of [`Team::state`]: step generation, task count, next unclaimed task.
const GEN_BITS: u32 = 24;
const IDX_BITS: u32 = 20;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
/// The most tasks one step can have (larger calls are grouped).
const MAX_TASKS: usize = IDX_MASK as usize;

fn pack(generation: u64, n: usize, next: usize) -> u64 {
    (generation & ((1 << GEN_BITS) - 1)) << (2 * IDX_BITS) | (n as u64) << IDX_BITS | next as u64
}

/// A leader thread and the pool's other workers, spinning between its parallel steps.
///
/// A step is `n` tasks, `f(0) … f(n - 1)`. The leader publishes it in `state` (generation, `n`, next
/// task), everyone claims tasks one at a time by compare-and-swap, and the leader returns once `done`
/// reaches `n`. A claim names the generation, so a helper that read an older step can never claim a
/// task of a newer one, and the step's closure is only called for tasks of the step in progress; the
/// leader can always finish the step alone, so a helper that never starts only costs speed.
#[derive(Default)]
struct Team {
    state: AtomicU64,
    /// The step's closure: a pointer to a `&dyn Fn(usize)` on the leader's stack, valid until `done`
    /// reaches the step's `n`.
    job: AtomicPtr<()>,
    done: AtomicUsize,
    /// A task panicked; the leader re-raises it once the step is over.
    panicked: AtomicBool,
    finished: AtomicBool,
}

type Task<'a> = &'a (dyn Fn(usize) + Sync);

impl Team {
    /// A helper's life: claim and run tasks until the leader is done.
    fn serve(&self) {
        // A helper job taken by the leader itself (waiting in a rayon join, or after `f` when `scope`
        // runs what nobody else took) must return at once: it would wait for its own caller.
        if std::ptr::eq(TEAM.with(|t| t.get()), self) {
            return;
        }
        let mut idle = 0u32;
        while !self.finished.load(Ordering::Acquire) {
            if self.work() {
                idle = 0;
                continue;
            }
            std::hint::spin_loop();
            idle = idle.wrapping_add(1);
            // Now and then, rayon work of the pool (code inside `install` that uses rayon directly),
            // which this thread would otherwise leave to the leader alone.
            if idle.is_multiple_of(256) {
                rayon::yield_now();
            }
        }
    }

    /// Claims and runs one task of the step in progress; false if none is left.
    fn work(&self) -> bool {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let (n, next) = ((s >> IDX_BITS & IDX_MASK) as usize, (s & IDX_MASK) as usize);
            if next >= n {
                return false;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // SAFETY: task `next` of this step is ours, so the step is in progress: the leader
                    // stored its closure before publishing it and keeps it alive until `done` reaches
                    // `n`, which needs this task's increment below.
                    let f: Task = unsafe { *(self.job.load(Ordering::Acquire) as *const Task) };
                    let r = panic::catch_unwind(AssertUnwindSafe(|| f(next)));
                    if r.is_err() {
                        self.panicked.store(true, Ordering::Relaxed);
                    }
                    self.done.fetch_add(1, Ordering::Release);
                    return true;
                }
                Err(now) => s = now,
            }
        }
    }

    /// Runs a step of `n <= MAX_TASKS` tasks with the helpers and returns when all are done.
    fn step(&self, n: usize, f: Task) {
        let prev = self.state.load(Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        self.job
            .store(&f as *const Task as *mut (), Ordering::Relaxed);
        self.state
            .store(pack((prev >> (2 * IDX_BITS)) + 1, n, 0), Ordering::Release);
        IN_STEP.with(|b| b.set(true));
        while self.work() {}
        IN_STEP.with(|b| b.set(false));
        // The helpers' last tasks: a short wait, as the leader claimed whatever was left.
        while self.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        if self.panicked.swap(false, Ordering::Relaxed) {
            panic!("a parallel task panicked");
        }
    }
}

/// Runs `f(0) … f(n - 1)` in parallel: on the calling thread's team inside [`install`], else on rayon.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    for_each_dyn(n, &f)
}

fn for_each_dyn(n: usize, f: Task) {
    let team = TEAM.with(|t| t.get());
    if n <= 1 || IN_STEP.with(|b| b.get()) {
        (0..n).for_each(f);
    } else if team.is_null() {
        use rayon::prelude::*;
        (0..n).into_par_iter().for_each(f);
    } else if n > MAX_TASKS {
        let per = n.div_ceil(MAX_TASKS);
        for_each_dyn(n.div_ceil(per), &|g| {
            (g * per..n.min((g + 1) * per)).for_each(f)
        });
    } else {
        // SAFETY: `team` is set only by a `Lead` on this thread, which lives (inside `install`) longer
        // than any call made from its closure, this one included.
        unsafe { &*team }.step(n, f);
    }
}

/// `f(i, chunk)` for the `i`-th `chunk`-long piece of `data` (the last may be shorter), in parallel.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    assert!(chunk > 0);
    let (len, base) = (data.len(), SendPtr(data.as_mut_ptr()));
    for_each(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        // SAFETY: task i alone touches elements start..start + chunk (clipped to len), `for_each` runs
        // each index once, and `data` stays mutably borrowed until it returns.
        let piece =
            unsafe { std::slice::from_raw_parts_mut(base.at(start), chunk.min(len - start)) };
        f(i, piece)
    });
}

/// `f(item)` for every item, in parallel (items carry their own `&mut` pieces of outputs).
pub fn for_each_item<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    let mut items: Vec<Option<T>> = items.into_iter().map(Some).collect();
    for_each_chunk_mut(&mut items, 1, |_, slot| {
        if let Some(item) = slot[0].take() {
            f(item)
        }
    });
}

/// [`for_each_item`] when `split`, else the items in order on this thread: for work whose size decides
/// whether handing part of it to the other threads pays.
pub fn for_each_item_if<T: Send>(split: bool, items: Vec<T>, f: impl Fn(T) + Sync) {
    if split {
        for_each_item(items, f)
    } else {
        items.into_iter().for_each(f)
    }
}

/// `f(run)` over `0..units` in runs of at most `grain` units, in parallel, each unit in exactly one run:
/// the range is cut into one contiguous part per thread, each thread runs its own part front to back,
/// and a thread whose part is done takes runs from the back of the others' parts until none is left.
///
/// Why, for a decode's products (units of weight rows; measured at `quantized::DECODE_RUN_BYTES`):
/// each thread reads one sequential stream per step, and the threads still finish within a run of each
/// other.
pub fn for_each_run(units: usize, grain: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    assert!(grain > 0 && u32::try_from(units).is_ok(), "{units} units");
    let n = threads().max(1).min(units.max(1));
    // A part's unclaimed units, `front..back`, in one word: its owner and a thief each claim with a
    // single compare-and-swap, from either end.
    let pack = |front: usize, back: usize| (front as u64) << 32 | back as u64;
    let parts: Vec<Part> = (0..n)
        .map(|i| Part(AtomicU64::new(pack(units * i / n, units * (i + 1) / n))))
        .collect();
    let claim = |Part(part): &Part, from_back: bool| {
        let mut s = part.load(Ordering::Relaxed);
        loop {
            let (front, back) = ((s >> 32) as usize, (s & 0xffff_ffff) as usize);
            if front >= back {
                return None;
            }
            let len = grain.min(back - front);
            let (rest, run) = if from_back {
                (pack(front, back - len), back - len..back)
            } else {
                (pack(front + len, back), front..front + len)
            };
            match part.compare_exchange_weak(s, rest, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(run),
                Err(now) => s = now,
            }
        }
    };
    for_each(n, |i| {
        while let Some(run) = claim(&parts[i], false) {
            f(run);
        }
        for other in (1..n).map(|d| (i + d) % n) {
            while let Some(run) = claim(&parts[other], true) {
                f(run);
            }
        }
    });
}

/// A part of [`for_each_run`]'s range, on a cache line of its own (two, as a core may fetch lines in
/// pairs), so that a thread's claims from its own part do not take the line from the other thread.
/// In one line, that first load held 0.9 % of a Q8_0 decode's samples, 0.4 % apart (whole decodes
/// level within the noise).
#[repr(align(128))]
struct Part(AtomicU64);

/// A raw pointer the tasks of one step may share; each task derives only its own disjoint piece (here,
/// and in the GEMM's output).
pub(crate) struct SendPtr<T>(pub(crate) *mut T);

impl<T> SendPtr<T> {
    /// Taken by a method (not the field) so closures capture the whole wrapper, which is `Sync`.
    pub(crate) fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SendPtr<T> {}

// SAFETY: every user turns the pointer only into pieces no other task touches (`for_each_chunk_mut`,
// [`SharedOut`]), and keeps the buffer borrowed until its tasks are done.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// A product's output, `tokens × stride`, shared by the tasks of one step, each of which writes only its
/// own band of columns (its rows of the weight matrix) for every token. Every token's row holds a piece
/// of each band, which no split of a slice can express; tasks writing into buffers of their own and
/// copying them into place afterwards cost a serial pass over the whole output (see the GEMM, and
/// `quantized::matmul_acts_many`).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut {
    p: SendPtr<f32>,
    pub(crate) stride: usize,
    pub(crate) tokens: usize,
}

impl SharedOut {
    pub(crate) fn new(out: &mut [f32], tokens: usize) -> SharedOut {
        assert!(tokens > 0 && out.len().is_multiple_of(tokens));
        SharedOut {
            p: SendPtr(out.as_mut_ptr()),
            stride: out.len() / tokens,
            tokens,
        }
    }

    /// Where column `c` of token `tok`'s row is; the caller writes there only within its own band.
    pub(crate) fn at(&self, tok: usize, c: usize) -> *mut f32 {
        assert!(tok < self.tokens && c < self.stride);
        self.p.at(tok * self.stride + c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_runs_on_a_pool_thread() {
        assert!(rayon::current_thread_index().is_none());
        let inside = install(|| rayon::current_thread_index().is_some());
        assert!(inside);
    }

    /// Every index runs exactly once.
    fn each_index_once(sizes: &[usize]) {
        for &n in sizes {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn steps_run_every_task_once() {
        // Around the task limit too (larger steps are grouped); Miri is far too slow for that.
        #[cfg(not(miri))]
        let (sizes, steps) = ([0, 1, 2, 3, 17, 1000, MAX_TASKS + 5], 500);
        #[cfg(miri)]
        let (sizes, steps) = ([0, 1, 2, 3, 17, 40, 41], 5);
        each_index_once(&sizes);
        install(|| each_index_once(&sizes));
        install(|| {
            // Many short steps in a row, as a decode step makes.
            for _ in 0..steps {
                each_index_once(&[2, 16, 40]);
            }
        });
    }

    #[test]
    fn a_team_step_uses_the_other_threads() {
        // A pool of its own: the global one may be busy with other tests' steps.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let seen = pool.install(|| {
            install(|| {
                let seen = std::sync::Mutex::new(std::collections::HashSet::new());
                // Steps of tasks long enough that a spinning helper claims some, repeated for a while:
                // on a loaded test machine the helper's thread may start late.
                let start = std::time::Instant::now();
                while seen.lock().unwrap().len() < 2 && start.elapsed().as_secs() < 10 {
                    for_each(64, |_| {
                        let t = std::time::Instant::now();
                        while t.elapsed()
                            < std::time::Duration::from_micros(if cfg!(miri) { 5 } else { 200 })
                        {
                        }
                        seen.lock().unwrap().insert(rayon::current_thread_index());
                    });
                }
                seen.into_inner().unwrap()
            })
        });
        assert!(seen.len() >= 2, "threads used: {seen:?}");
    }

    #[test]
    fn chunks_and_items_cover_their_data() {
        install(|| {
            let mut v = vec![0u32; 1003];
            for_each_chunk_mut(&mut v, 10, |i, c| {
                assert!(c.len() == 10 || (i == 100 && c.len() == 3));
                c.iter_mut()
                    .enumerate()
                    .for_each(|(k, x)| *x = (i * 10 + k) as u32);
            });
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
            let mut out = vec![0u64; 50];
            let items: Vec<(usize, &mut u64)> = out.iter_mut().enumerate().collect();
            for_each_item(items, |(i, o)| *o = (i * i) as u64);
            assert!(out.iter().enumerate().all(|(i, &x)| x == (i * i) as u64));
        });
    }

    /// Every unit in exactly one run, no run longer than the grain, on the team and off it, and as a
    /// nested call (which runs every part on one thread, stealing included).
    #[test]
    fn runs_cover_every_unit_once() {
        let check = |units: usize, grain: usize| {
            let hits: Vec<AtomicUsize> = (0..units).map(|_| AtomicUsize::new(0)).collect();
            for_each_run(units, grain, |run| {
                assert!(!run.is_empty() && run.len() <= grain, "{run:?}");
                run.for_each(|u| {
                    hits[u].fetch_add(1, Ordering::Relaxed);
                });
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "{units} units, grain {grain}"
            );
        };
        let cases = [
            (0, 1),
            (1, 1),
            (1, 5),
            (2, 1),
            (7, 3),
            (100, 1),
            (1000, 7),
            (18992, 32),
        ];
        cases.iter().for_each(|&(u, g)| check(u, g));
        install(|| {
            for _ in 0..if cfg!(miri) { 2 } else { 50 } {
                cases.iter().for_each(|&(u, g)| check(u, g));
            }
            for_each(3, |_| check(1000, 7));
        });
    }

    #[test]
    fn a_nested_call_runs_inside_its_task() {
        install(|| {
            let total = AtomicUsize::new(0);
            for_each(8, |_| {
                for_each(5, |_| {
                    install(|| total.fetch_add(1, Ordering::Relaxed));
                });
            });
            assert_eq!(total.load(Ordering::Relaxed), 40);
        });
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_goes_on() {
        let r = std::panic::catch_unwind(|| {
            install(|| {
                for_each(32, |i| assert!(i != 7, "task 7 fails"));
            })
        });
        assert!(r.is_err());
        // The pool is still usable afterwards.
        install(|| each_index_once(&[2, 100]));
    }

    #[test]
    fn concurrent_installs_finish() {
        // Test threads (and library users) may run forward passes at the same time: more leaders than
        // pool threads must still all finish.
        std::thread::scope(|s| {
            for _ in 0..if cfg!(miri) { 3 } else { 4 } {
                s.spawn(|| {
                    for _ in 0..if cfg!(miri) { 2 } else { 20 } {
                        install(|| each_index_once(&[2, 100]));
                    }
                });
            }
        });
    }
}
