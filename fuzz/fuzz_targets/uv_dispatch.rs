//! Feed arbitrary bytes to the emulated UV's raw UVC dispatcher (`dispatch::call`, the same
//! entry as `host.uv.native.call`). `fuzz_one` keeps one UV with a registered, touched 16 MiB
//! region across inputs, so sequences of calls build up state (configs, CPUs, secure pages).
//! The property: no panic, no crash, no sanitizer report, for any input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pvfast_core::dispatch::fuzz_one(data);
});
