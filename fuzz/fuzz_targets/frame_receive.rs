//! Any bytes arriving on a transfer connection are read as frames by the destination: each is a
//! control frame, a data frame written inside the reservation, a refused data frame (nothing
//! written), or a typed error — never a panic, and never a byte written outside the reserved
//! blocks (checked against a copy of the cache taken before). The first input byte chooses an
//! unencrypted connection or an encrypted one (data frames then need a tag that opens: the
//! header checks and the refusal paths run either way).
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use llumlet_dataplane::kv::{HostKvCache, MappedRegion};
use llumlet_dataplane::aead::FrameKey;
use llumlet_dataplane::transport::{receive_frame_keyed, DataSink, Frame, ReservedBlocks};

const BLOCKS: u64 = 8;
const BLOCK_BYTES: u64 = 64;
const RESERVED: [u32; 3] = [2, 3, 5];

static CACHE: Mutex<Option<HostKvCache>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = CACHE.lock().unwrap();
    let cache = guard.get_or_insert_with(|| {
        let path = format!("/dev/shm/llumlet-fuzz-frames-{}", std::process::id());
        HostKvCache::create(std::path::Path::new(&path), 2, BLOCKS, BLOCK_BYTES, BLOCK_BYTES)
            .unwrap()
    });
    let maps: Vec<MappedRegion> = cache
        .regions()
        .unwrap()
        .iter()
        .map(|r| MappedRegion::map(r).unwrap())
        .collect();
    let snapshot = |c: &mut HostKvCache| -> Vec<Vec<u8>> {
        (0..2)
            .flat_map(|l| (0..BLOCKS).map(move |b| (l, b)))
            .map(|(l, b)| c.token_mut(l, b, 0).unwrap().to_vec())
            .collect()
    };
    let before = snapshot(cache);
    let sink = DataSink::new(maps, ReservedBlocks::new(&RESERVED));
    let Some((&mode, mut input)) = data.split_first() else {
        return;
    };
    let mut key = (mode & 1 == 1).then(|| FrameKey::new(&[7u8; 32]));
    let mut buf = Vec::new();
    while let Ok(f) = receive_frame_keyed(&mut input, &mut buf, &sink, key.as_mut()) {
        if let Frame::Data(Ok(n)) = f {
            assert!(n <= BLOCKS * BLOCK_BYTES);
        }
    }
    let after = snapshot(cache);
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        let block = (i as u64 % BLOCKS) as u32;
        if !RESERVED.contains(&block) {
            assert_eq!(a, b, "block {block} outside the reservation changed");
        }
    }
});
