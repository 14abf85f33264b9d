//! The simulated decode engine: a step loop over seeded requests with a paged KV-cache
//! allocator, publishing its status through the shared-memory interface like a real engine.
//!
//! This is the first part of the simulated engine: scheduling, block accounting and status.
//! The KV bytes in shared memory, the request table and the command queues come with the rest
//! of the engine interface.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytemuck::Zeroable;

use crate::command::Command;
use crate::engine::EngineEndpoint;
use crate::request_table::{RequestInfo, RequestState, TableError};
use crate::segment::SegmentError;
use crate::status_ring::StatusRecord;

/// Settings of the simulated engine.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where the control segment goes.
    pub segment: PathBuf,
    /// Requests admitted over the run (from a seeded generator).
    pub requests: u32,
    /// Output tokens per request before it finishes.
    pub max_tokens: u32,
    /// Time per step.
    pub step: Duration,
    /// Seed of the request generator.
    pub seed: u64,
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV blocks in the cache.
    pub num_blocks: u32,
    /// Largest prompt, in tokens (prompts are 1..=this).
    pub max_prompt: u32,
    /// Publish a status every this many steps (`LLUMNIX_INSTANCE_UPDATE_STEPS`).
    pub update_steps: u32,
    /// PUSH mode: publish every `update_steps` steps. PULL mode (`false`): only when asked.
    pub push: bool,
}

/// A request in the simulated engine.
#[derive(Debug, Clone)]
pub struct SimRequest {
    /// Its id.
    pub id: String,
    /// Prompt tokens.
    pub prompt: u32,
    /// Output tokens so far.
    pub output: u32,
    /// KV blocks held (their ids).
    pub blocks: Vec<u32>,
    /// Arrival order.
    pub arrival: u64,
    /// Slot in the request table, once published.
    pub slot: Option<u32>,
    /// Blocks already written to the request table.
    published_blocks: usize,
}

impl SimRequest {
    fn tokens(&self) -> u32 {
        self.prompt + self.output
    }
}

/// SplitMix64: small, seeded, and the same on every platform.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The engine's scheduling state, separate from time and I/O so tests can step it.
pub struct SimEngine {
    cfg: SimConfig,
    rng: SplitMix64,
    admitted: u32,
    waiting: VecDeque<SimRequest>,
    running: Vec<SimRequest>,
    free: Vec<u32>,
    /// Table slots of requests that finished, to be freed by `sync`.
    finished_slots: Vec<u32>,
    step_id: u32,
    update_id: u32,
    finished: u32,
    preempted: u32,
}

impl SimEngine {
    /// An engine with an empty cache.
    pub fn new(cfg: SimConfig) -> SimEngine {
        SimEngine {
            rng: SplitMix64(cfg.seed),
            free: (0..cfg.num_blocks).rev().collect(),
            finished_slots: Vec::new(),
            cfg,
            admitted: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            step_id: 0,
            update_id: 0,
            finished: 0,
            preempted: 0,
        }
    }

    fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.cfg.block_size.max(1))
    }

    fn free_blocks(&self) -> u32 {
        self.free.len() as u32
    }

    /// One step: admit a new request, schedule waiting ones that fit, decode one token for each
    /// running request (allocating a block when one fills), finish those at `max_tokens`.
    pub fn step(&mut self) {
        self.step_id = self.step_id.wrapping_add(1);
        if self.admitted < self.cfg.requests {
            let prompt = 1 + (self.rng.next_u64() % u64::from(self.cfg.max_prompt.max(1))) as u32;
            self.waiting.push_back(SimRequest {
                id: format!("sim-{}-{}", self.cfg.seed, self.admitted),
                prompt,
                output: 0,
                blocks: Vec::new(),
                arrival: u64::from(self.admitted),
                slot: None,
                published_blocks: 0,
            });
            self.admitted += 1;
        }
        while let Some(front) = self.waiting.front() {
            let need = self.blocks_for(front.tokens() + 1) as usize;
            if need > self.free.len() {
                break;
            }
            let mut r = self.waiting.pop_front().expect("front exists");
            let at = self.free.len() - need;
            r.blocks = self.free.split_off(at);
            self.running.push(r);
        }
        let mut i = 0;
        while i < self.running.len() {
            let need = self.blocks_for(self.running[i].tokens() + 1) as usize;
            if need > self.running[i].blocks.len() {
                let Some(b) = self.free.pop() else {
                    // Preempt the youngest running request (recompute later, as vLLM does):
                    // its blocks go back, it returns to the front of the waiting queue.
                    let mut victim = self.running.pop().expect("request i is running");
                    self.free.append(&mut victim.blocks);
                    self.waiting.push_front(victim);
                    self.preempted += 1;
                    continue;
                };
                self.running[i].blocks.push(b);
            }
            self.running[i].output += 1;
            if self.running[i].output >= self.cfg.max_tokens {
                let mut done = self.running.swap_remove(i);
                self.free.append(&mut done.blocks);
                self.finished_slots.extend(done.slot);
                self.finished += 1;
                continue;
            }
            i += 1;
        }
    }

    /// Brings the request table in line with the engine's requests.
    pub fn sync(&mut self, endpoint: &mut EngineEndpoint) -> Result<(), TableError> {
        for slot in self.finished_slots.drain(..) {
            endpoint.remove_request(slot)?;
        }
        let waiting = self.waiting.iter_mut().map(|r| (r, RequestState::Waiting));
        let running = self.running.iter_mut().map(|r| (r, RequestState::Running));
        for (r, state) in waiting.chain(running) {
            let Some(slot) = r.slot else {
                let info = RequestInfo {
                    id: &r.id,
                    state,
                    arrival: r.arrival,
                    prompt_tokens: r.prompt,
                    output_tokens: r.output,
                };
                r.slot = Some(endpoint.add_request(&info, &r.blocks)?);
                r.published_blocks = r.blocks.len();
                continue;
            };
            if r.published_blocks > r.blocks.len() {
                endpoint.set_request_blocks(slot, &r.blocks)?;
                r.published_blocks = r.blocks.len();
            }
            endpoint.request_progress(slot, state, r.output, &r.blocks[r.published_blocks..])?;
            r.published_blocks = r.blocks.len();
        }
        Ok(())
    }

    /// The status record of the current state.
    pub fn status(&mut self) -> StatusRecord {
        self.update_id = self.update_id.wrapping_add(1);
        let mut r = StatusRecord::zeroed();
        r.monotonic_ns = crate::segment::monotonic_ns();
        r.step_id = self.step_id as i32;
        r.update_id = self.update_id as i32;
        r.num_running_requests = self.running.len() as i32;
        r.scheduler_running_to_decode_requests_num = self.running.len() as i32;
        r.scheduler_running_to_decode_tokens_num =
            self.running.iter().map(|q| q.tokens() as i32).sum();
        r.num_waiting_requests = self.waiting.len() as i32;
        r.num_uncomputed_tokens_all_waiting_prefills =
            self.waiting.iter().map(|q| q.tokens() as i32).sum();
        r.num_uncomputed_tokens_scheduler_waiting_prefills =
            r.num_uncomputed_tokens_all_waiting_prefills;
        r.num_total_gpu_tokens = (self.cfg.num_blocks * self.cfg.block_size) as i32;
        r.num_used_gpu_tokens =
            ((self.cfg.num_blocks - self.free_blocks()) * self.cfg.block_size) as i32;
        r.profiling_id = -1;
        // Ids are at most 63 bytes by construction ("sim-<u64>-<u32>").
        let _ = r.set_waiting_ids(self.waiting.iter().map(|q| q.id.as_str()));
        r
    }

    /// Running requests.
    pub fn running(&self) -> &[SimRequest] {
        &self.running
    }

    /// Preemptions so far.
    pub fn preempted(&self) -> u32 {
        self.preempted
    }

    /// Requests finished so far.
    pub fn finished(&self) -> u32 {
        self.finished
    }
}

/// Runs the engine until `stop` is set: one step per `cfg.step`, a status every
/// `cfg.update_steps` steps.
pub fn run(cfg: SimConfig, stop: &AtomicBool) -> Result<(), SegmentError> {
    let mut endpoint = EngineEndpoint::create_at(&cfg.segment)?;
    let update_steps = cfg.update_steps.max(1);
    let step = cfg.step;
    let push_mode = cfg.push;
    let mut engine = SimEngine::new(cfg);
    let mut next = Instant::now();
    let mut n: u64 = 0;
    let mut bad_commands = 0u64;
    let mut table_errors = 0u64;
    while !stop.load(Ordering::Relaxed) {
        loop {
            match endpoint.poll_command() {
                Ok(None) => break,
                Ok(Some(Command::StatusRequest { seq })) => {
                    let rec = engine.status();
                    endpoint.publish(&rec);
                    let publish_seq = endpoint.segment().status().published();
                    // A full reply queue means the llumlet is not reading; the status is in the
                    // ring either way.
                    let _ = endpoint.send(&Command::StatusPublished { seq, publish_seq });
                }
                Ok(Some(cmd)) => {
                    // Migration commands come with the live-migration protocol.
                    let id = match cmd {
                        Command::Abort { id, .. } => id,
                        Command::MigrateOutBegin { migration, .. }
                        | Command::MigrateOutSuspend { migration, .. }
                        | Command::MigrateOutCommit { migration, .. }
                        | Command::MigrateOutAbort { migration, .. }
                        | Command::ReserveBlocks { migration, .. }
                        | Command::MigrateInCommit { migration }
                        | Command::MigrateInAbort { migration } => migration,
                        _ => 0,
                    };
                    let _ = endpoint.send(&Command::Reply {
                        id,
                        ok: false,
                        value: 0,
                    });
                }
                Err(e) => {
                    bad_commands += 1;
                    if bad_commands == 1 {
                        eprintln!("sim-engine: bad command from the llumlet: {e}");
                    }
                    break;
                }
            }
        }
        engine.step();
        if let Err(e) = engine.sync(&mut endpoint) {
            table_errors += 1;
            if table_errors == 1 {
                eprintln!("sim-engine: request table: {e}");
            }
        }
        n += 1;
        if push_mode && n.is_multiple_of(u64::from(update_steps)) {
            let rec = engine.status();
            endpoint.publish(&rec);
        }
        next += step;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SimConfig {
        SimConfig {
            segment: PathBuf::new(),
            requests: 10,
            max_tokens: 50,
            step: Duration::ZERO,
            seed: 7,
            block_size: 16,
            num_blocks: 20,
            max_prompt: 100,
            update_steps: 1,
            push: true,
        }
    }

    #[test]
    fn blocks_are_conserved_and_requests_finish() {
        let mut e = SimEngine::new(cfg());
        for _ in 0..2000 {
            e.step();
            let mut all: Vec<u32> = e
                .running()
                .iter()
                .flat_map(|r| r.blocks.iter().copied())
                .collect();
            all.extend(&e.free);
            all.sort_unstable();
            assert_eq!(
                all,
                (0..20).collect::<Vec<_>>(),
                "every block is held once or free"
            );
            for r in e.running() {
                assert!(
                    r.blocks.len() as u32 * 16 >= r.tokens(),
                    "a request's tokens fit its blocks"
                );
            }
        }
        assert_eq!(e.finished(), 10);
        assert!(
            e.preempted() > 0,
            "20 blocks cannot hold 10 requests: some were preempted"
        );
        let s = e.status();
        assert_eq!(
            (
                s.num_running_requests,
                s.num_waiting_requests,
                s.num_used_gpu_tokens
            ),
            (0, 0, 0)
        );
        assert_eq!(s.num_total_gpu_tokens, 320);
    }

    #[test]
    fn same_seed_same_run() {
        let (mut a, mut b) = (SimEngine::new(cfg()), SimEngine::new(cfg()));
        for _ in 0..100 {
            a.step();
            b.step();
        }
        let ra: Vec<_> = a
            .running()
            .iter()
            .map(|r| (r.id.clone(), r.prompt, r.output))
            .collect();
        let rb: Vec<_> = b
            .running()
            .iter()
            .map(|r| (r.id.clone(), r.prompt, r.output))
            .collect();
        assert_eq!(ra, rb);
    }
}
