//! Any file where a control segment's locator is expected attaches as a precise state (not
//! ready, incompatible, stale, or ready), never a panic; a ready one can be read. The file is
//! read as a locator (dataplane/src/sealed.rs), so this fuzzes its parser and the checks of
//! whatever process and descriptor a parsed one names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llumlet_dataplane::segment::{Attach, ControlSegment};

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("llumlet-fuzz-seg-{}", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(Attach::Ready(seg)) = ControlSegment::attach(&path) {
        let _ = llumlet_dataplane::status_ring::read_newest(seg.status());
        let _ = seg.kv().regions();
        let _ = llumlet_dataplane::request_table::read_request(seg.requests(), 0, &mut Vec::new());
    }
    let _ = std::fs::remove_file(&path);
});
