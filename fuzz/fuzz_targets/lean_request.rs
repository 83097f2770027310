#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = herald::fuzzing::lean_request(data) {
        panic!("lean_request: {e}");
    }
});
