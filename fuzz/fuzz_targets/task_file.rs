#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = duet_fuzz::scratch();
    duet_fuzz::tasks_targets::task_file(data, dir.path());
});
