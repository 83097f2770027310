#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = herald::fuzzing::centrifugo_command(data) {
        panic!("centrifugo_command: {e}");
    }
});
