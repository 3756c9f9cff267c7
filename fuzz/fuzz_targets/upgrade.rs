#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kanava_fuzzing::upgrade(data));
