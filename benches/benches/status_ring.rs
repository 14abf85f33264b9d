//! The engine interface's status ring: engine publish, llumlet read of the newest record, read
//! while a writer publishes on another core; baseline: a plain copy of one record.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};

use bytemuck::Zeroable;
use criterion::{criterion_group, criterion_main, Criterion};
use llumlet_dataplane::endpoint::EngineEndpoint;
use llumlet_dataplane::segment::{Attach, ControlSegment};
use llumlet_dataplane::status_ring::{read_newest, StatusRecord};

fn record() -> StatusRecord {
    let mut r = StatusRecord::zeroed();
    r.counters.num_running_requests = 64;
    r.counters.num_waiting_requests = 8;
    r.counters.num_total_gpu_tokens = 1 << 20;
    let ids: Vec<String> = (0..8).map(|i| format!("chatcmpl-{i:032}")).collect();
    r.set_waiting_ids(ids.iter().map(String::as_str)).unwrap();
    r
}

fn bench(c: &mut Criterion) {
    let path = std::env::temp_dir().join(format!("llumlet-bench-ring-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut engine = EngineEndpoint::create_at(&path).unwrap();
    let Attach::Ready(reader) = ControlSegment::attach(&path).unwrap() else {
        panic!("attach")
    };
    let rec = record();
    let mut g = c.benchmark_group("status_ring");
    g.bench_function("baseline_copy_record", |b| {
        let src = record();
        b.iter(|| black_box(*black_box(&src)))
    });
    g.bench_function("engine_publish", |b| {
        b.iter(|| engine.publish(black_box(&rec)))
    });
    g.bench_function("llumlet_read_newest", |b| {
        b.iter(|| black_box(read_newest(reader.status()).unwrap()))
    });
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                engine.publish(&rec);
            }
        });
        g.bench_function("llumlet_read_newest_under_writer", |b| {
            b.iter(|| black_box(read_newest(reader.status()).unwrap()))
        });
        stop.store(true, Ordering::Relaxed);
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
