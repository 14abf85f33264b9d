//! The llumlet's per-status work: accept (mask), complete, encode, as the status loop does it.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use llumlet::config::MigrationLimits;
use llumlet::status::{MetricMask, MigrationLoad, StatusReporter};
use llumlet_proto::cms::InstanceStatus;

fn status() -> InstanceStatus {
    InstanceStatus {
        update_id: 1,
        step_id: 1,
        num_total_gpu_tokens: 1 << 20,
        num_used_gpu_tokens: 123_456,
        num_running_requests: 64,
        num_waiting_requests: 8,
        scheduler_running_to_decode_requests_num: 64,
        scheduler_running_to_decode_tokens_num: 200_000,
        num_uncomputed_tokens_all_waiting_prefills: 4096,
        waiting_requests: (0..8).map(|i| format!("chatcmpl-{i:032}")).collect(),
        profiling_id: -1,
        ..Default::default()
    }
}

fn limits() -> MigrationLimits {
    MigrationLimits {
        enabled: true,
        detailed: true,
        max_req_in: 1,
        max_req_out: 1,
        max_token_in: 100_000,
        max_token_out: 100_000,
        max_ratio_in: 0.3,
        max_ratio_out: 0.3,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("status_path");
    let now = Instant::now();
    let local = MigrationLoad::default();
    for (name, mask) in [
        ("all", MetricMask::ALL),
        ("num_requests", MetricMask::parse("num_requests")),
    ] {
        let mut r =
            StatusReporter::new("instance-0".into(), limits(), mask, Duration::from_secs(30));
        let fresh = status();
        g.bench_function(format!("accept_complete_encode/{name}"), |b| {
            let mut ts = 0;
            b.iter(|| {
                ts += 1;
                r.accept(fresh.clone(), now);
                r.tick(true, now, ts, &local);
                r.encoded().len()
            })
        });
        g.bench_function(format!("repeat_complete_encode/{name}"), |b| {
            let mut ts = 1 << 40;
            b.iter(|| {
                ts += 1;
                r.tick(false, now, ts, &local);
                r.encoded().len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
