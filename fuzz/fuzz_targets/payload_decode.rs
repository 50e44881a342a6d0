#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tether::fuzz_checks::payload_decode(data);
});
