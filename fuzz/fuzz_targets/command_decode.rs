//! Any 64 bytes on a command queue decode to a command or a typed error, never a panic, and a
//! decoded command encodes back to words that decode to the same command.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llumlet_dataplane::command::{Command, MESSAGE_WORDS};

fuzz_target!(|data: &[u8]| {
    let mut words = [0u64; MESSAGE_WORDS];
    for (w, chunk) in words.iter_mut().zip(data.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_le_bytes(b);
    }
    if let Ok(c) = Command::decode(&words) {
        assert_eq!(Command::decode(&c.encode()), Ok(c));
    }
});
