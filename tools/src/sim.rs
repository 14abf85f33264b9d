//! The simulated decode engine: a step loop over seeded requests with a paged KV-cache
//! allocator, publishing its status through the shared-memory interface like a real engine.
//!
//! Its KV cache is real: a host shared-memory segment registered in the KV region registry, in
//! which every token's slot of every layer holds bytes that are a deterministic function of
//! (request id, position, layer) ([`fill_token_kv`]), and every output token is a deterministic
//! function of the request's history. So anyone can check, from the request table and the KV
//! cache alone, that a request's state is exactly what an unmigrated run would have.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytemuck::Zeroable;

use llumlet_dataplane::command::Command;
use llumlet_dataplane::endpoint::EngineEndpoint;
use llumlet_dataplane::kv::HostKvCache;
use llumlet_dataplane::request_table::{RequestInfo, RequestState, TableError};
pub use llumlet_dataplane::rng::SplitMix64;
use llumlet_dataplane::segment::SegmentError;
use llumlet_dataplane::status_ring::StatusRecord;

/// Settings of the simulated engine.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where the control segment goes.
    pub segment: PathBuf,
    /// Requests admitted over the run (from a seeded generator).
    pub requests: u32,
    /// Steps between two admissions (1: one request per step).
    pub admit_every: u32,
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
    /// Largest prompt, in tokens (prompts are `min_prompt..=max_prompt`).
    pub max_prompt: u32,
    /// Smallest prompt, in tokens (at least 1).
    pub min_prompt: u32,
    /// Publish a status every this many steps (`LLUMNIX_INSTANCE_UPDATE_STEPS`).
    pub update_steps: u32,
    /// PUSH mode: publish every `update_steps` steps. PULL mode (`false`): only when asked.
    pub push: bool,
    /// Layers of the KV cache.
    pub layers: u32,
    /// KV heads per layer.
    pub kv_heads: u32,
    /// Elements per head (fp16, 2 bytes each).
    pub head_size: u32,
    /// Keep the KV cache on GPU 0 (feature `cuda`), registered as a CUDA IPC handle, instead of
    /// in host shared memory.
    pub kv_on_gpu: bool,
}

impl SimConfig {
    /// Bytes of one token's K and V in one layer.
    pub fn token_size_bytes(&self) -> u64 {
        2 * u64::from(self.kv_heads) * u64::from(self.head_size) * 2
    }

    /// Bytes of one block in one layer.
    pub fn block_size_bytes(&self) -> u64 {
        u64::from(self.block_size) * self.token_size_bytes()
    }
}

fn mix(a: u64, b: u64) -> u64 {
    SplitMix64(a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

/// The seed of a request's KV bytes and tokens: FNV-1a of its id.
pub fn request_seed(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The KV bytes of token `pos` of the request with `seed` in `layer`.
pub fn fill_token_kv(seed: u64, pos: u64, layer: u32, out: &mut [u8]) {
    let mut rng = SplitMix64(mix(mix(seed, pos), u64::from(layer)));
    for chunk in out.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// The digest of the first `n` output tokens of the request with `seed`: what an unmigrated
/// run produces, to compare with [`SimRequest::digest`].
pub fn expected_digest(seed: u64, n: u32) -> u64 {
    let (mut last, mut digest) = (0u32, 0u64);
    for k in 0..n {
        last = next_token(seed, k, last);
        digest = mix(digest, u64::from(last));
    }
    digest
}

/// Output token `k` of a request, given the previous token.
pub fn next_token(seed: u64, k: u32, prev: u32) -> u32 {
    (mix(mix(seed, u64::from(k)), u64::from(prev)) % 32_000) as u32
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
    /// `request_seed(id)`.
    pub seed: u64,
    /// The last output token.
    pub last_token: u32,
    /// A digest of the output token stream.
    pub digest: u64,
    /// The migration moving it out, between `MigrateOutBegin` and its end.
    pub migration: Option<u64>,
    /// Arrived by migration (checked on arrival and when it finishes).
    pub migrated_in: bool,
}

/// A request's state as the simulated engine serializes it for migration (its mailbox state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimState {
    /// Prompt tokens.
    pub prompt: u32,
    /// Output tokens so far.
    pub output: u32,
    /// The last output token.
    pub last_token: u32,
    /// Digest of the output stream.
    pub digest: u64,
    /// Waiting (no KV to keep) rather than running.
    pub waiting: bool,
}

impl SimState {
    const BYTES: usize = 21;

    /// Its bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::BYTES);
        v.extend_from_slice(&self.prompt.to_le_bytes());
        v.extend_from_slice(&self.output.to_le_bytes());
        v.extend_from_slice(&self.last_token.to_le_bytes());
        v.extend_from_slice(&self.digest.to_le_bytes());
        v.push(u8::from(self.waiting));
        v
    }

    /// Decodes bytes from a mailbox.
    pub fn decode(b: &[u8]) -> Option<SimState> {
        if b.len() != Self::BYTES || b[20] > 1 {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Some(SimState {
            prompt: u32_at(0),
            output: u32_at(4),
            last_token: u32_at(8),
            digest: u64::from_le_bytes(b[12..20].try_into().expect("8 bytes")),
            waiting: b[20] == 1,
        })
    }
}

/// Blocks reserved for a request migrating in.
#[derive(Debug)]
struct Incoming {
    migration: u64,
    id: String,
    blocks: Vec<u32>,
    slot: u32,
}

impl SimRequest {
    fn tokens(&self) -> u32 {
        self.prompt + self.output
    }
}

/// Where the engine keeps its KV cache.
pub enum SimKv {
    /// A host shared-memory segment (`MemoryKind::HostShm` regions).
    Host(HostKvCache),
    /// GPU memory exported as a CUDA IPC handle, written with host-to-device copies from a
    /// staging buffer.
    #[cfg(feature = "cuda")]
    Gpu(llumlet_dataplane::cuda::GpuKvCache, Vec<u8>),
}

impl From<HostKvCache> for SimKv {
    fn from(h: HostKvCache) -> SimKv {
        SimKv::Host(h)
    }
}

impl SimKv {
    /// The regions the engine registers.
    pub fn regions(&self) -> Result<Vec<llumlet_dataplane::kv::KvRegion>, String> {
        match self {
            SimKv::Host(h) => h.regions().map_err(|e| e.to_string()),
            #[cfg(feature = "cuda")]
            SimKv::Gpu(g, _) => g.regions().map_err(|e| e.to_string()),
        }
    }

    /// Lets `fill` write `n` token slots of one block from `slot` (in place on the host; in the
    /// staging buffer, then copied to the GPU). `false` outside the cache or when the copy
    /// failed.
    fn write_span(
        &mut self,
        layer: u32,
        block: u64,
        slot: u64,
        n: u64,
        fill: impl FnOnce(&mut [u8]),
    ) -> bool {
        match self {
            SimKv::Host(h) => match h.tokens_mut(layer, block, slot, n) {
                Some(s) => {
                    fill(s);
                    true
                }
                None => false,
            },
            #[cfg(feature = "cuda")]
            SimKv::Gpu(g, staging) => {
                let len = (n * g.token_size_bytes()) as usize;
                staging.resize(len, 0);
                fill(&mut staging[..len]);
                g.write_tokens(layer, block, slot, &staging[..len]).is_ok()
            }
        }
    }

    /// Waits until this step's writes have landed (GPU: `cuCtxSynchronize`; host: nothing).
    fn synchronize(&self) -> bool {
        match self {
            SimKv::Host(_) => true,
            #[cfg(feature = "cuda")]
            SimKv::Gpu(g, _) => g.synchronize().is_ok(),
        }
    }

    /// Reads `out.len()` bytes of whole token slots of one block from `slot`.
    fn read_span(&mut self, layer: u32, block: u64, slot: u64, out: &mut [u8]) -> bool {
        match self {
            SimKv::Host(h) => {
                let n = out.len() as u64 / h.token_size_bytes().max(1);
                match h.tokens_mut(layer, block, slot, n) {
                    Some(s) if s.len() == out.len() => {
                        out.copy_from_slice(s);
                        true
                    }
                    _ => false,
                }
            }
            #[cfg(feature = "cuda")]
            SimKv::Gpu(g, _) => g.read_tokens(layer, block, slot, out).is_ok(),
        }
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
    kv: Option<SimKv>,
    kv_errors: u64,
    scratch: Vec<u8>,
    expect: Vec<u8>,
    /// Requests suspended for migration (blocks kept, not stepped), with whether they were
    /// waiting.
    suspended: Vec<(SimRequest, bool)>,
    incoming: Vec<Incoming>,
    /// Migrations committed in, so a late `MigrateInAbort` is refused (newest last, bounded).
    committed_in: VecDeque<u64>,
    /// Requests that migrated in and are not verified yet.
    arrived: Vec<String>,
    next_arrival: u64,
    /// Where mailboxes live (beside the control segment).
    segment: PathBuf,
    /// Lines reporting migrations and finished migrated requests (drained by `run`).
    pub events: Vec<String>,
}

impl SimEngine {
    /// An engine with an empty cache.
    pub fn new(cfg: SimConfig) -> SimEngine {
        let segment = cfg.segment.clone();
        let mut e = SimEngine {
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
            kv: None,
            kv_errors: 0,
            scratch: Vec::new(),
            expect: Vec::new(),
            suspended: Vec::new(),
            incoming: Vec::new(),
            committed_in: VecDeque::new(),
            arrived: Vec::new(),
            next_arrival: 0,
            segment: PathBuf::new(),
            events: Vec::new(),
        };
        e.segment = segment;
        e
    }

    fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.cfg.block_size.max(1))
    }

    /// Gives the engine a KV cache to write.
    pub fn with_kv(mut self, kv: impl Into<SimKv>) -> SimEngine {
        self.kv = Some(kv.into());
        self
    }

    /// Writes the KV bytes of positions `from..to` of `r` in every layer, a block's span of
    /// positions at a time.
    fn write_kv(
        kv: &mut Option<SimKv>,
        cfg: &SimConfig,
        r: &SimRequest,
        from: u32,
        to: u32,
    ) -> u64 {
        let Some(kv) = kv.as_mut() else { return 0 };
        let mut failed = 0;
        let (bs, tsb) = (cfg.block_size.max(1), cfg.token_size_bytes() as usize);
        let mut pos = from;
        while pos < to {
            let end = to.min((pos / bs + 1) * bs);
            let Some(&block) = r.blocks.get((pos / bs) as usize) else {
                return failed;
            };
            for layer in 0..cfg.layers {
                let fill = |s: &mut [u8]| {
                    for (i, t) in s.chunks_exact_mut(tsb).enumerate() {
                        fill_token_kv(r.seed, u64::from(pos) + i as u64, layer, t);
                    }
                };
                let (b, slot, n) = (u64::from(block), u64::from(pos % bs), u64::from(end - pos));
                if !kv.write_span(layer, b, slot, n, fill) {
                    failed += 1;
                }
            }
            pos = end;
        }
        failed
    }

    /// Checks that `r`'s output token stream is exactly an unmigrated run's.
    pub fn verify_tokens(r: &SimRequest) -> Result<(), String> {
        if r.digest == expected_digest(r.seed, r.output) {
            Ok(())
        } else {
            Err(format!(
                "{}: token stream of {} tokens differs",
                r.id, r.output
            ))
        }
    }

    /// Checks that every token of `r` has exactly its deterministic KV bytes in every layer
    /// (read back from the GPU when the cache is there).
    pub fn verify_kv(&mut self, r: &SimRequest) -> Result<(), String> {
        let Some(kv) = self.kv.as_mut() else {
            return Err("no KV cache".into());
        };
        let (bs, tsb) = (
            self.cfg.block_size.max(1),
            self.cfg.token_size_bytes() as usize,
        );
        let (got, expect) = (&mut self.scratch, &mut self.expect);
        let mut pos = 0;
        while pos < r.tokens() {
            let end = r.tokens().min((pos / bs + 1) * bs);
            let block = r.blocks[(pos / bs) as usize];
            let n = (end - pos) as usize;
            got.resize(n * tsb, 0);
            expect.resize(n * tsb, 0);
            for layer in 0..self.cfg.layers {
                if !kv.read_span(layer, u64::from(block), u64::from(pos % bs), got) {
                    return Err(format!(
                        "{}: KV of tokens {pos}..{end} in layer {layer} (block {block}) cannot be read",
                        r.id
                    ));
                }
                for (i, t) in expect.chunks_exact_mut(tsb).enumerate() {
                    fill_token_kv(r.seed, u64::from(pos) + i as u64, layer, t);
                }
                if let Some(i) = (0..n).find(|&i| got[i * tsb..][..tsb] != expect[i * tsb..][..tsb])
                {
                    return Err(format!(
                        "{}: KV of token {} in layer {layer} (block {block}) differs",
                        r.id,
                        pos as usize + i
                    ));
                }
            }
            pos = end;
        }
        Ok(())
    }

    fn free_blocks(&self) -> u32 {
        self.free.len() as u32
    }

    /// One step: admit a new request, schedule waiting ones that fit, decode one token for each
    /// running request (allocating a block when one fills), finish those at `max_tokens`.
    /// Checks the requests that migrated in since the last step (KV bytes and tokens) and
    /// reports each as an event.
    fn verify_arrivals(&mut self) {
        for id in std::mem::take(&mut self.arrived) {
            let (r, waiting) = match self.running.iter().find(|r| r.id == id) {
                Some(r) => (r.clone(), false),
                None => match self.waiting.iter().find(|r| r.id == id) {
                    Some(r) => (r.clone(), true),
                    None => continue,
                },
            };
            let r = &r;
            let kv = if waiting {
                "none"
            } else if self.verify_kv(r).is_ok() {
                "ok"
            } else {
                "BAD"
            };
            let tokens = if Self::verify_tokens(r).is_ok() {
                "ok"
            } else {
                "BAD"
            };
            let line = format!(
                "migrated-in {} output={} kv={kv} tokens={tokens}",
                r.id, r.output
            );
            self.events.push(line);
        }
    }

    /// One engine step: check arrivals, admit, decode, publish.
    pub fn step(&mut self) {
        self.verify_arrivals();
        self.step_id = self.step_id.wrapping_add(1);
        if self.admitted < self.cfg.requests
            && self.step_id.is_multiple_of(self.cfg.admit_every.max(1))
        {
            let lo = self.cfg.min_prompt.clamp(1, self.cfg.max_prompt.max(1));
            let span = u64::from(self.cfg.max_prompt.max(1) - lo) + 1;
            let prompt = lo + (self.rng.next_u64() % span) as u32;
            self.waiting.push_back(SimRequest {
                seed: request_seed(&format!("sim-{}-{}", self.cfg.seed, self.admitted)),
                last_token: 0,
                digest: 0,
                id: format!("sim-{}-{}", self.cfg.seed, self.admitted),
                prompt,
                output: 0,
                blocks: Vec::new(),
                arrival: self.next_arrival,
                slot: None,
                published_blocks: 0,
                migration: None,
                migrated_in: false,
            });
            self.admitted += 1;
            self.next_arrival += 1;
        }
        while let Some(front) = self.waiting.front() {
            let need = self.blocks_for(front.tokens() + 1) as usize;
            if need > self.free.len() {
                break;
            }
            let mut r = self.waiting.pop_front().expect("front exists");
            let at = self.free.len() - need;
            r.blocks = self.free.split_off(at);
            // Prefill (or recompute after preemption): every position gets its KV.
            self.kv_errors += Self::write_kv(&mut self.kv, &self.cfg, &r, 0, r.tokens());
            self.running.push(r);
        }
        let mut i = 0;
        while i < self.running.len() {
            let need = self.blocks_for(self.running[i].tokens() + 1) as usize;
            if need > self.running[i].blocks.len() {
                let Some(b) = self.free.pop() else {
                    // Preempt the youngest running request not being migrated (recompute
                    // later, as vLLM does): its blocks go back, it returns to the front of the
                    // waiting queue. With no such victim, this request waits a step.
                    let Some(v) = self.running.iter().rposition(|r| r.migration.is_none()) else {
                        i += 1;
                        continue;
                    };
                    let mut victim = self.running.remove(v);
                    if v < i {
                        i -= 1;
                    }
                    self.free.append(&mut victim.blocks);
                    self.waiting.push_front(victim);
                    self.preempted += 1;
                    continue;
                };
                self.running[i].blocks.push(b);
            }
            let r = &mut self.running[i];
            r.last_token = next_token(r.seed, r.output, r.last_token);
            r.digest = mix(r.digest, u64::from(r.last_token));
            r.output += 1;
            let pos = r.tokens() - 1;
            self.kv_errors +=
                Self::write_kv(&mut self.kv, &self.cfg, &self.running[i], pos, pos + 1);
            if self.running[i].output >= self.cfg.max_tokens {
                let mut done = self.running.remove(i);
                if done.migrated_in {
                    let ok = Self::verify_tokens(&done).is_ok();
                    self.events.push(format!(
                        "finished {} output={} migrated_in=true tokens={}",
                        done.id,
                        done.output,
                        if ok { "ok" } else { "BAD" }
                    ));
                } else {
                    self.events
                        .push(format!("finished {} output={}", done.id, done.output));
                }
                self.free.append(&mut done.blocks);
                self.finished_slots.extend(done.slot);
                self.finished += 1;
                continue;
            }
            i += 1;
        }
        if let Some(kv) = &self.kv {
            if !kv.synchronize() {
                self.kv_errors += 1;
            }
        }
    }

    /// KV writes (or step-end synchronizations) that failed so far: a GPU copy the driver
    /// refused. The request's bytes are then wrong, which verification on arrival reports.
    pub fn kv_errors(&self) -> u64 {
        self.kv_errors
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

    fn find_out(&mut self, slot: u32, migration: Option<u64>) -> Option<(bool, usize)> {
        let m = |r: &SimRequest| r.slot == Some(slot) && r.migration == migration;
        if let Some(i) = self.running.iter().position(m) {
            return Some((false, i));
        }
        self.waiting.iter().position(m).map(|i| (true, i))
    }

    fn take_out(&mut self, waiting: bool, i: usize) -> SimRequest {
        if waiting {
            self.waiting.remove(i).expect("index from position")
        } else {
            self.running.remove(i)
        }
    }

    fn reply(id: u64, ok: bool, value: u64) -> Command {
        Command::Reply { id, ok, value }
    }

    /// Carries out a migration or abort command; returns the reply. Status requests are
    /// answered by the caller (they need the endpoint's ring).
    pub fn handle(&mut self, cmd: Command, endpoint: &mut EngineEndpoint) -> Option<Command> {
        use llumlet_dataplane::fault::{self, Action, Point};
        let point = match cmd {
            Command::MigrateOutBegin { migration, .. } => Some((Point::EngineBegin, migration)),
            Command::MigrateOutSuspend { migration, .. } => Some((Point::EngineSuspend, migration)),
            Command::ReserveBlocks { migration, .. } => Some((Point::EngineReserve, migration)),
            Command::MigrateInCommit { migration } => Some((Point::EngineCommitIn, migration)),
            _ => None,
        };
        if let Some((point, migration)) = point {
            if fault::at(point) == Some(Action::Refuse) {
                return Some(Self::reply(migration, false, 0));
            }
        }
        Some(match cmd {
            Command::StatusRequest { .. }
            | Command::StatusPublished { .. }
            | Command::Reply { .. } => return None,
            Command::MigrateOutBegin { migration, slot } => match self.find_out(slot, None) {
                Some((w, i)) => {
                    let r = if w {
                        &mut self.waiting[i]
                    } else {
                        &mut self.running[i]
                    };
                    r.migration = Some(migration);
                    Self::reply(migration, true, u64::from(r.tokens()))
                }
                None => Self::reply(migration, false, 0),
            },
            Command::MigrateOutSuspend { migration, slot } => {
                if self
                    .suspended
                    .iter()
                    .any(|(r, _)| r.migration == Some(migration))
                {
                    return Some(Self::reply(migration, true, 0));
                }
                let Some((waiting, i)) = self.find_out(slot, Some(migration)) else {
                    return Some(Self::reply(migration, false, 0));
                };
                let r = self.take_out(waiting, i);
                let state = SimState {
                    prompt: r.prompt,
                    output: r.output,
                    last_token: r.last_token,
                    digest: r.digest,
                    waiting,
                };
                let mail = llumlet_dataplane::mailbox::Mail {
                    request_id: r.id.clone(),
                    state: state.encode(),
                };
                let ok = mail
                    .write(&llumlet_dataplane::mailbox::path(&self.segment, migration))
                    .is_ok();
                let _ = endpoint.request_progress(
                    slot,
                    RequestState::Suspended,
                    r.output,
                    &r.blocks[r.published_blocks.min(r.blocks.len())..],
                );
                let mut r = r;
                r.published_blocks = r.blocks.len();
                let tokens = u64::from(r.tokens());
                self.suspended.push((r, waiting));
                if !ok {
                    // Cannot hand the state over: resume at once and refuse.
                    self.resume(migration);
                }
                Self::reply(migration, ok, tokens)
            }
            Command::MigrateOutCommit { migration, .. } => {
                let Some(i) = self
                    .suspended
                    .iter()
                    .position(|(r, _)| r.migration == Some(migration))
                else {
                    return Some(Self::reply(migration, false, 0));
                };
                let (mut r, _) = self.suspended.remove(i);
                self.free.append(&mut r.blocks);
                if let Some(slot) = r.slot {
                    let _ = endpoint.remove_request(slot);
                }
                llumlet_dataplane::mailbox::remove(&llumlet_dataplane::mailbox::path(
                    &self.segment,
                    migration,
                ));
                self.events
                    .push(format!("migrated-out {} output={}", r.id, r.output));
                Self::reply(migration, true, 0)
            }
            Command::MigrateOutAbort { migration, slot } => {
                llumlet_dataplane::mailbox::remove(&llumlet_dataplane::mailbox::path(
                    &self.segment,
                    migration,
                ));
                if self.resume(migration) {
                    return Some(Self::reply(migration, true, 0));
                }
                match self.find_out(slot, Some(migration)) {
                    Some((w, i)) => {
                        let r = if w {
                            &mut self.waiting[i]
                        } else {
                            &mut self.running[i]
                        };
                        r.migration = None;
                        Self::reply(migration, true, 0)
                    }
                    None => Self::reply(migration, false, 0),
                }
            }
            Command::ReserveBlocks { migration, blocks } => {
                self.reserve(migration, blocks, endpoint)
            }
            Command::MigrateInCommit { migration } => self.commit_in(migration, endpoint),
            Command::MigrateInAbort { migration } => {
                llumlet_dataplane::mailbox::remove(&llumlet_dataplane::mailbox::path(
                    &self.segment,
                    migration,
                ));
                if self.committed_in.contains(&migration) {
                    return Some(Self::reply(migration, false, 0));
                }
                if let Some(i) = self.incoming.iter().position(|x| x.migration == migration) {
                    let mut inc = self.incoming.remove(i);
                    self.free.append(&mut inc.blocks);
                    let _ = endpoint.remove_request(inc.slot);
                }
                Self::reply(migration, true, 0)
            }
            Command::Abort { id, slot } => match self.find_any(slot) {
                Some(mut r) => {
                    // A suspended request's state, handed over for its migration, goes with it.
                    if let Some(m) = r.migration {
                        llumlet_dataplane::mailbox::remove(&llumlet_dataplane::mailbox::path(
                            &self.segment,
                            m,
                        ));
                    }
                    self.free.append(&mut r.blocks);
                    let _ = endpoint.remove_request(slot);
                    self.events.push(format!("aborted {}", r.id));
                    Self::reply(id, true, 0)
                }
                None => match self.incoming.iter().position(|x| x.slot == slot) {
                    // A request migrating in: drop the reservation; its source keeps it.
                    Some(i) => {
                        let mut inc = self.incoming.remove(i);
                        // And its mailbox (the request id the reservation was made for): the
                        // llumlet that wrote it may be gone (the orphan sweep of its successor
                        // aborts by slot, not knowing the migration).
                        llumlet_dataplane::mailbox::remove(&llumlet_dataplane::mailbox::path(
                            &self.segment,
                            inc.migration,
                        ));
                        self.free.append(&mut inc.blocks);
                        let _ = endpoint.remove_request(slot);
                        self.events.push(format!("aborted-in {}", inc.id));
                        Self::reply(id, true, 0)
                    }
                    None => Self::reply(id, false, 0),
                },
            },
        })
    }

    /// Takes a live request (running, waiting or suspended) out of the engine by table slot.
    fn find_any(&mut self, slot: u32) -> Option<SimRequest> {
        if let Some(i) = self.running.iter().position(|r| r.slot == Some(slot)) {
            return Some(self.running.remove(i));
        }
        if let Some(i) = self.waiting.iter().position(|r| r.slot == Some(slot)) {
            return self.waiting.remove(i);
        }
        let i = self
            .suspended
            .iter()
            .position(|(r, _)| r.slot == Some(slot))?;
        Some(self.suspended.remove(i).0)
    }

    /// Puts a suspended request back where it was; whether there was one.
    fn resume(&mut self, migration: u64) -> bool {
        let Some(i) = self
            .suspended
            .iter()
            .position(|(r, _)| r.migration == Some(migration))
        else {
            return false;
        };
        let (mut r, waiting) = self.suspended.remove(i);
        r.migration = None;
        if waiting {
            self.waiting.push_front(r);
        } else {
            self.running.push(r);
        }
        true
    }

    fn reserve(&mut self, migration: u64, blocks: u32, endpoint: &mut EngineEndpoint) -> Command {
        let fail = Self::reply(migration, false, 0);
        let idx = match self.incoming.iter().position(|x| x.migration == migration) {
            Some(i) => i,
            None => {
                let Ok(mail) = llumlet_dataplane::mailbox::Mail::read(
                    &llumlet_dataplane::mailbox::path(&self.segment, migration),
                ) else {
                    return fail;
                };
                let known = |r: &SimRequest| r.id == mail.request_id;
                if self.running.iter().any(known)
                    || self.waiting.iter().any(known)
                    || self.suspended.iter().any(|(r, _)| known(r))
                    || self.incoming.iter().any(|x| x.id == mail.request_id)
                {
                    // The same request twice on one instance: refuse.
                    return fail;
                }
                let info = RequestInfo {
                    id: &mail.request_id,
                    state: RequestState::MigratingIn,
                    arrival: self.next_arrival,
                    prompt_tokens: 0,
                    output_tokens: 0,
                };
                let Ok(slot) = endpoint.add_request(&info, &[]) else {
                    return fail;
                };
                self.incoming.push(Incoming {
                    migration,
                    id: mail.request_id,
                    blocks: Vec::new(),
                    slot,
                });
                self.incoming.len() - 1
            }
        };
        let inc = &mut self.incoming[idx];
        let need = (blocks as usize).saturating_sub(inc.blocks.len());
        if need > self.free.len() {
            return Self::reply(migration, false, inc.blocks.len() as u64);
        }
        let at = self.free.len() - need;
        inc.blocks.extend(self.free.split_off(at));
        if endpoint.set_request_blocks(inc.slot, &inc.blocks).is_err() {
            return fail;
        }
        Self::reply(migration, true, u64::from(inc.slot))
    }

    fn commit_in(&mut self, migration: u64, endpoint: &mut EngineEndpoint) -> Command {
        let fail = Self::reply(migration, false, 0);
        if self.committed_in.contains(&migration) {
            return Self::reply(migration, true, 0);
        }
        let Some(i) = self.incoming.iter().position(|x| x.migration == migration) else {
            return fail;
        };
        let path = llumlet_dataplane::mailbox::path(&self.segment, migration);
        let Some((mail, st)) = llumlet_dataplane::mailbox::Mail::read(&path)
            .ok()
            .and_then(|m| SimState::decode(&m.state).map(|s| (m, s)))
        else {
            return fail;
        };
        if mail.request_id != self.incoming[i].id {
            return fail;
        }
        let inc = self.incoming.remove(i);
        llumlet_dataplane::mailbox::remove(&path);
        let mut r = SimRequest {
            seed: request_seed(&inc.id),
            id: inc.id,
            prompt: st.prompt,
            output: st.output,
            blocks: inc.blocks,
            arrival: self.next_arrival,
            slot: Some(inc.slot),
            published_blocks: 0,
            last_token: st.last_token,
            digest: st.digest,
            migration: None,
            migrated_in: true,
        };
        self.next_arrival += 1;
        let keep = if st.waiting {
            0
        } else {
            self.blocks_for(r.tokens()) as usize
        };
        if keep > r.blocks.len() {
            // Fewer blocks than the state needs: the source sent too little. Refuse.
            let inc = Incoming {
                migration,
                id: r.id,
                blocks: r.blocks,
                slot: inc.slot,
            };
            self.incoming.push(inc);
            return fail;
        }
        let mut extra = r.blocks.split_off(keep);
        self.free.append(&mut extra);
        // The reservation's table entry becomes the request's (prompt and output included).
        let _ = endpoint.remove_request(inc.slot);
        r.slot = None;
        let info = RequestInfo {
            id: &r.id,
            state: if st.waiting {
                RequestState::Waiting
            } else {
                RequestState::Running
            },
            arrival: r.arrival,
            prompt_tokens: r.prompt,
            output_tokens: r.output,
        };
        if let Ok(slot) = endpoint.add_request(&info, &r.blocks) {
            r.slot = Some(slot);
            r.published_blocks = r.blocks.len();
        }
        // Verified at the start of the next step, after the reply went out: the check reads
        // every token's KV and must not count as migration downtime. Nothing has decoded yet
        // then, so it sees exactly what arrived.
        self.arrived.push(r.id.clone());
        if st.waiting {
            self.waiting.push_back(r);
        } else {
            self.running.push(r);
        }
        self.committed_in.push_back(migration);
        if self.committed_in.len() > 1024 {
            self.committed_in.pop_front();
        }
        Self::reply(migration, true, 0)
    }

    /// The status record of the current state.
    pub fn status(&mut self) -> StatusRecord {
        self.update_id = self.update_id.wrapping_add(1);
        let mut r = StatusRecord::zeroed();
        r.monotonic_ns = llumlet_dataplane::sys::monotonic_ns();
        r.counters.step_id = self.step_id as i32;
        r.counters.update_id = self.update_id as i32;
        r.counters.num_running_requests = self.running.len() as i32;
        r.counters.scheduler_running_to_decode_requests_num = self.running.len() as i32;
        r.counters.scheduler_running_to_decode_tokens_num =
            self.running.iter().map(|q| q.tokens() as i32).sum();
        r.counters.num_waiting_requests = self.waiting.len() as i32;
        r.counters.num_uncomputed_tokens_all_waiting_prefills =
            self.waiting.iter().map(|q| q.tokens() as i32).sum();
        r.counters.num_uncomputed_tokens_scheduler_waiting_prefills =
            r.counters.num_uncomputed_tokens_all_waiting_prefills;
        r.counters.num_total_gpu_tokens = (self.cfg.num_blocks * self.cfg.block_size) as i32;
        r.counters.num_used_gpu_tokens =
            ((self.cfg.num_blocks - self.free_blocks()) * self.cfg.block_size) as i32;
        r.counters.profiling_id = -1;
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

    /// One line for the end of a run: free blocks, and requests still held in each state.
    pub fn summary(&self) -> String {
        format!(
            "free_blocks={} of {} running={} waiting={} suspended={} incoming={}",
            self.free.len(),
            self.cfg.num_blocks,
            self.running.len(),
            self.waiting.len(),
            self.suspended.len(),
            self.incoming.len()
        )
    }
}

/// The engine's KV cache: on GPU 0 when `cfg.kv_on_gpu`, else a host segment at `path`.
fn kv_cache(cfg: &SimConfig, path: &std::path::Path) -> Result<SimKv, String> {
    let (layers, blocks) = (cfg.layers, u64::from(cfg.num_blocks));
    let (bsb, tsb) = (cfg.block_size_bytes(), cfg.token_size_bytes());
    if cfg.kv_on_gpu {
        #[cfg(feature = "cuda")]
        return llumlet_dataplane::cuda::GpuKvCache::create(0, layers, blocks, bsb, tsb)
            .map(|g| SimKv::Gpu(g, Vec::new()))
            .map_err(|e| format!("a KV cache on the GPU: {e}"));
        #[cfg(not(feature = "cuda"))]
        return Err(
            "a KV cache on the GPU needs the `cuda` feature, which this build lacks".into(),
        );
    }
    HostKvCache::create(path, layers, blocks, bsb, tsb)
        .map(SimKv::Host)
        .map_err(|e| e.to_string())
}

/// Runs the engine until `stop` is set: one step per `cfg.step`, a status every
/// `cfg.update_steps` steps.
pub fn run(cfg: SimConfig, stop: &AtomicBool) -> Result<(), SegmentError> {
    // The KV cache exists before the control segment, and its regions are registered the moment
    // the segment does: a llumlet attaching to the segment finds them (a GPU cache takes a while
    // to allocate and zero, and a destination without regions refuses a migration).
    let mut kv_path = cfg.segment.clone().into_os_string();
    kv_path.push("-kv");
    let io = |op: &'static str, e: String| SegmentError::Io {
        op,
        path: kv_path.clone().into(),
        source: std::io::Error::other(e),
    };
    let kv =
        kv_cache(&cfg, std::path::Path::new(&kv_path)).map_err(|e| io("create KV cache", e))?;
    let mut endpoint = EngineEndpoint::create_at(&cfg.segment)?;
    for region in kv.regions().map_err(|e| io("register KV cache", e))? {
        endpoint
            .register_kv_region(&region)
            .map_err(|e| io("register KV cache", e.to_string()))?;
    }
    let update_steps = cfg.update_steps.max(1);
    let step = cfg.step;
    let push_mode = cfg.push;
    let mut engine = SimEngine::new(cfg).with_kv(kv);
    let mut next = Instant::now();
    let mut n: u64 = 0;
    let mut bad_commands = 0u64;
    let mut table_errors = 0u64;
    let mut kv_errors_reported = false;
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
                    if let Some(reply) = engine.handle(cmd, &mut endpoint) {
                        // A full reply queue means the llumlet is not reading; it times the
                        // command out and resolves it by the protocol's rules.
                        let _ = endpoint.send(&reply);
                    }
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
        for line in engine.events.drain(..) {
            println!("sim-engine: {line}");
        }
        if engine.kv_errors() > 0 && !kv_errors_reported {
            kv_errors_reported = true;
            eprintln!("sim-engine: KV cache writes are failing (outside the cache, or refused by the GPU driver)");
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
    println!("sim-engine: stopped {}", engine.summary());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SimConfig {
        SimConfig {
            segment: PathBuf::new(),
            requests: 10,
            admit_every: 1,
            max_tokens: 50,
            step: Duration::ZERO,
            seed: 7,
            block_size: 16,
            num_blocks: 20,
            max_prompt: 100,
            min_prompt: 1,
            update_steps: 1,
            push: true,
            layers: 2,
            kv_heads: 1,
            head_size: 4,
            kv_on_gpu: false,
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
                s.counters.num_running_requests,
                s.counters.num_waiting_requests,
                s.counters.num_used_gpu_tokens
            ),
            (0, 0, 0)
        );
        assert_eq!(s.counters.num_total_gpu_tokens, 320);
    }

    #[test]
    #[cfg_attr(miri, ignore = "files and mmap are outside Miri")]
    fn kv_bytes_survive_preemption_and_verify() {
        let path = std::env::temp_dir().join(format!("llumlet-sim-kv-{}", std::process::id()));
        let c = cfg();
        let kv = HostKvCache::create(
            &path,
            c.layers,
            u64::from(c.num_blocks),
            c.block_size_bytes(),
            c.token_size_bytes(),
        )
        .unwrap();
        let mut e = SimEngine::new(c).with_kv(kv);
        let mut corrupted_once = false;
        for step in 0..300 {
            e.step();
            if step % 10 == 0 {
                let running = e.running().to_vec();
                for r in &running {
                    e.verify_kv(r).unwrap();
                    SimEngine::verify_tokens(r).unwrap();
                }
                if let (false, Some(r)) = (corrupted_once, running.first()) {
                    // Flip one byte of a running request: verification notices; flip it back.
                    let Some(SimKv::Host(h)) = e.kv.as_mut() else {
                        panic!("a host cache")
                    };
                    h.token_mut(1, u64::from(r.blocks[0]), 0).unwrap()[3] ^= 1;
                    assert!(e.verify_kv(r).unwrap_err().contains("token 0 in layer 1"));
                    let Some(SimKv::Host(h)) = e.kv.as_mut() else {
                        panic!("a host cache")
                    };
                    h.token_mut(1, u64::from(r.blocks[0]), 0).unwrap()[3] ^= 1;
                    e.verify_kv(r).unwrap();
                    let mut tampered = r.clone();
                    tampered.digest ^= 1;
                    assert!(SimEngine::verify_tokens(&tampered).is_err());
                    corrupted_once = true;
                }
            }
        }
        assert!(corrupted_once);
        assert!(
            e.preempted() > 0,
            "recompute after preemption rewrote the KV bytes"
        );
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
