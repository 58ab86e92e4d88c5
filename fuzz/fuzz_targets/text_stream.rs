#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    duet_fuzz::qwen2_targets::text_stream(data);
});
