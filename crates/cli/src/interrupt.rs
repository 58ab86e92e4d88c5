//! Ctrl-C stops the reply being generated, not the program.

use std::sync::atomic::{AtomicBool, Ordering};

pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler: the first Ctrl-C while idle exits as usual; during generation it only stops it.
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            INTERRUPTED.store(true, Ordering::SeqCst);
        } else {
            eprintln!();
            std::process::exit(130);
        }
    });
}

static GENERATING: AtomicBool = AtomicBool::new(false);

/// Marks the start of a request: Ctrl-C from now on stops it.
pub fn reset() {
    INTERRUPTED.store(false, Ordering::SeqCst);
    GENERATING.store(true, Ordering::SeqCst);
}

pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Marks the end of a request.
pub fn idle() {
    GENERATING.store(false, Ordering::SeqCst);
}
