//! Any bytes a client sends to the demo's embedded CMS are read as RESP commands and run: each
//! is a command answered, or a protocol error answered once before the connection closes —
//! never a panic or a hang, and no buffer larger than the bytes that actually arrived (a bulk
//! length the client declares but does not send costs nothing).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = llumlet_tools::demo::serve_bytes(data);
});
