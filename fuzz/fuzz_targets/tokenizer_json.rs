#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = duet_fuzz::scratch();
    duet_fuzz::qwen2_targets::tokenizer_json(data, dir.path());
});
