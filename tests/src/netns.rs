//! Two "hosts" on one machine, for network faults that loopback cannot show: each host is a
//! network namespace with its own /dev/shm (a tmpfs in a mount namespace of its own), so a
//! llumlet there can reach the other host only over the network, and `auto` must pick a network
//! transport. The hosts are joined by a veth pair, the **data link** (transfer connections go
//! over it), and each has a management link to a bridge in the test's namespace (Redis and the
//! test's gRPC calls), so cutting the data link partitions the two hosts and nothing else.
//!
//! ```text
//!   test process, redis-server ── bridge lb<k> 10.201.<k>.254
//!        │ 10.201.<k>.1                     │ 10.201.<k>.2
//!   host a (netns lh<k>a)  ── data link ──  host b (netns lh<k>b)
//!        10.202.<k>.1      veth ld<k>a/b      10.202.<k>.2
//! ```
//!
//! Faults are nftables rules in each host: random loss (`numgen random`, on every link) and a
//! silent partition of the data link (every packet dropped, as a switch that lost the link would: no reset, no
//! error, only silence), or the link deleted. Latency: [`TwoHosts::setup_delayed`] makes the data
//! link a pair of TUN devices joined by the test process, which holds every packet for the delay
//! before passing it on (the kernel here has no `tc netem`, and no `fq` for timed departures).
//! Building all this needs root; [`TwoHosts::setup`] says why it cannot instead of failing, and
//! the tests then skip with that message.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Two hosts (see the module docs). Everything is removed on drop.
pub struct TwoHosts {
    k: u32,
    anchors: Vec<Child>,
    /// The delaying data link, when the data link is one.
    delayed: Option<DelayedLink>,
    /// Each host's address on the management bridge (gRPC, metrics).
    pub mgmt: [String; 2],
    /// Each host's address on the data link (transfer connections).
    pub data: [String; 2],
    /// The test's address on the bridge (Redis listens there).
    pub bridge_ip: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl TwoHosts {
    /// Builds the two hosts, or says why this machine cannot (not root, no `ip`, no `nft`, no
    /// network namespaces).
    pub fn setup() -> Result<TwoHosts, String> {
        TwoHosts::setup_with(None)
    }

    /// [`TwoHosts::setup`] with a data link that holds every packet `ms` milliseconds each way
    /// (TUN devices joined by this process; see the module docs).
    pub fn setup_delayed(ms: u32) -> Result<TwoHosts, String> {
        TwoHosts::setup_with(Some(ms))
    }

    fn setup_with(delay_ms: Option<u32>) -> Result<TwoHosts, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (network and mount namespaces)".into());
        }
        for tool in ["ip", "nft", "nsenter", "unshare"] {
            if Command::new(tool).arg("--version").output().is_err() {
                return Err(format!("`{tool}` is not installed"));
            }
        }
        let k = (std::process::id() + NEXT.fetch_add(1, Ordering::Relaxed) * 37) % 250 + 1;
        let mut hosts = TwoHosts {
            k,
            anchors: Vec::new(),
            delayed: None,
            mgmt: [format!("10.201.{k}.1"), format!("10.201.{k}.2")],
            data: [format!("10.202.{k}.1"), format!("10.202.{k}.2")],
            bridge_ip: format!("10.201.{k}.254"),
        };
        hosts.build(delay_ms)?;
        Ok(hosts)
    }

    fn ns(&self, h: usize) -> String {
        format!("lh{}{}", self.k, ["a", "b"][h])
    }

    /// Host `h`'s data-link device.
    pub fn data_dev(&self, h: usize) -> String {
        format!("ld{}{}", self.k, ["a", "b"][h])
    }

    fn build(&mut self, delay_ms: Option<u32>) -> Result<(), String> {
        let k = self.k;
        let br = format!("lb{k}");
        self.teardown_links();
        run(&["ip", "link", "add", &br, "type", "bridge"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.bridge_ip),
            "dev",
            &br,
        ])?;
        run(&["ip", "link", "set", &br, "up"])?;
        for h in 0..2 {
            let ns = self.ns(h);
            let (m, mp) = (format!("lm{k}{h}"), format!("lm{k}{h}p"));
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "link", "add", &m, "type", "veth", "peer", "name", &mp])?;
            run(&["ip", "link", "set", &m, "netns", &ns])?;
            run(&["ip", "link", "set", &mp, "master", &br, "up"])?;
            let addr = format!("{}/24", self.mgmt[h]);
            run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", &m])?;
            run(&["ip", "-n", &ns, "link", "set", &m, "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (da, db) = (self.data_dev(0), self.data_dev(1));
        match delay_ms {
            None => run(&[
                "ip", "link", "add", &da, "type", "veth", "peer", "name", &db,
            ])?,
            Some(ms) => {
                let ends = [tun_in(&self.ns(0), &da)?, tun_in(&self.ns(1), &db)?];
                self.delayed = Some(DelayedLink::start(ends, ms)?);
            }
        }
        for h in 0..2 {
            let (ns, dev) = (self.ns(h), self.data_dev(h));
            if delay_ms.is_none() {
                run(&["ip", "link", "set", &dev, "netns", &ns])?;
            } else {
                run(&["ip", "-n", &ns, "link", "set", &dev, "mtu", "9000"])?;
            }
            let addr = format!("{}/24", self.data[h]);
            run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", &dev])?;
            run(&["ip", "-n", &ns, "link", "set", &dev, "up"])?;
            run(&[
                "ip", "netns", "exec", &ns, "nft", "add", "table", "inet", "llt",
            ])?;
            for (chain, hook) in [("in", "input"), ("out", "output")] {
                let spec = format!("{{ type filter hook {hook} priority 0; }}");
                run(&[
                    "ip", "netns", "exec", &ns, "nft", "add", "chain", "inet", "llt", chain, &spec,
                ])?;
            }
            // The host's own /dev/shm: a mount namespace held by a process that only sleeps;
            // everything of this host enters its namespaces (`wrap`).
            let mut anchor = Command::new("ip")
                .args(["netns", "exec", &ns, "unshare", "--mount", "--propagation", "private"])
                .args([
                    "sh",
                    "-c",
                    "mount -t tmpfs -o mode=1777,size=4g tmpfs /dev/shm && echo up && exec sleep 100000",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start the host's anchor: {e}"))?;
            let mut line = String::new();
            let _ = BufReader::new(anchor.stdout.take().unwrap()).read_line(&mut line);
            if line.trim() != "up" {
                let _ = anchor.kill();
                let out = anchor
                    .wait_with_output()
                    .map(|o| o.stderr)
                    .unwrap_or_default();
                return Err(format!(
                    "cannot give the host its own /dev/shm: {}",
                    String::from_utf8_lossy(&out).trim()
                ));
            }
            self.anchors.push(anchor);
        }
        Ok(())
    }

    /// The command prefix that runs a program on host `h` (its network and its /dev/shm; the
    /// pid namespace is shared, so its processes are the test's children and signals reach them).
    pub fn wrap(&self, h: usize) -> Vec<String> {
        let pid = self.anchors[h].id().to_string();
        ["nsenter", "-t", &pid, "-m", "-n", "--"]
            .map(String::from)
            .to_vec()
    }

    /// Host `h`'s /dev/shm, as the test sees it.
    pub fn shm_dir(&self, h: usize) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root/dev/shm", self.anchors[h].id()))
    }

    /// Replaces each host's filter rules by `rule` on the data link (`all`: on every interface
    /// but loopback, the management link too), or by nothing.
    fn set_rules(&self, rule: Option<String>, all: bool) -> Result<(), String> {
        for h in 0..2 {
            let (ns, dev) = (self.ns(h), self.data_dev(h));
            for (chain, dir) in [("in", "iifname"), ("out", "oifname")] {
                run(&[
                    "ip", "netns", "exec", &ns, "nft", "flush", "chain", "inet", "llt", chain,
                ])?;
                if let Some(r) = &rule {
                    let on = if all {
                        format!("{dir} != lo")
                    } else {
                        format!("{dir} {dev}")
                    };
                    let cmd = format!("add rule inet llt {chain} {on} {r}");
                    run(&["ip", "netns", "exec", &ns, "nft", &cmd])?;
                }
            }
        }
        Ok(())
    }

    /// Drops `percent` of the packets each host sends and receives, at random, on every link
    /// (whichever the transports pick), each way (0: none).
    pub fn loss(&self, percent: u32) {
        let rule = (percent > 0).then(|| format!("numgen random mod 100 < {percent} drop"));
        self.set_rules(rule, true).unwrap();
    }

    /// Partitions the hosts (every data-link packet dropped, silently) or heals the partition.
    pub fn partition(&self, on: bool) {
        self.set_rules(on.then(|| "drop".to_string()), false)
            .unwrap();
    }

    /// Sets the delay of a delayed data link ([`TwoHosts::setup_delayed`]), each way.
    pub fn set_delay(&self, ms: u32) {
        if let Some(d) = &self.delayed {
            d.delay_us.store(u64::from(ms) * 1000, Ordering::Relaxed);
        }
    }

    fn teardown_links(&self) {
        let k = self.k;
        let _ = run(&["ip", "link", "del", &format!("lb{k}")]);
        for h in 0..2 {
            let _ = run(&["ip", "netns", "del", &self.ns(h)]);
            let _ = run(&["ip", "link", "del", &format!("lm{k}{h}p")]);
        }
        let _ = run(&["ip", "link", "del", &self.data_dev(0)]);
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        self.delayed.take();
        for a in &mut self.anchors {
            let _ = a.kill();
            let _ = a.wait();
        }
        self.teardown_links();
    }
}

/// A TUN device named `dev` in network namespace `ns` (its packets are read and written through
/// the returned descriptor; the device goes when the descriptor closes).
fn tun_in(ns: &str, dev: &str) -> Result<OwnedFd, String> {
    let (ns, dev) = (ns.to_string(), dev.to_string());
    // setns changes the calling thread's namespace only: a thread of its own, which ends.
    std::thread::spawn(move || -> Result<OwnedFd, String> {
        let nsf = std::fs::File::open(format!("/var/run/netns/{ns}"))
            .map_err(|e| format!("netns {ns}: {e}"))?;
        // SAFETY: a valid namespace descriptor; only this thread's namespace changes.
        if unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
        }
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| format!("/dev/net/tun: {e}"))?;
        // struct ifreq: the name, then the flags (IFF_TUN | IFF_NO_PI), padded to 40 bytes.
        let mut ifr = [0u8; 40];
        ifr[..dev.len()].copy_from_slice(dev.as_bytes());
        ifr[16..18].copy_from_slice(&(0x0001u16 | 0x1000).to_ne_bytes());
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `ifr` is (40 bytes).
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } != 0 {
            return Err(format!(
                "TUNSETIFF {dev}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(OwnedFd::from(tun))
    })
    .join()
    .map_err(|_| "the TUN thread panicked".to_string())?
}

/// Two TUN devices joined by this process: every packet read from one is written to the other
/// once it has waited the delay (in order: the delay is the same for every packet).
struct DelayedLink {
    stop: Arc<AtomicBool>,
    delay_us: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DelayedLink {
    fn start(ends: [OwnedFd; 2], ms: u32) -> Result<DelayedLink, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let delay_us = Arc::new(AtomicU64::new(u64::from(ms) * 1000));
        let files = ends.map(|fd| Arc::new(std::fs::File::from(fd)));
        let mut threads = Vec::new();
        for (from, to) in [(0, 1), (1, 0)] {
            let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
            let (input, output) = (Arc::clone(&files[from]), Arc::clone(&files[to]));
            let (stop_r, delay) = (Arc::clone(&stop), Arc::clone(&delay_us));
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop_r.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd: input.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, for the duration of the call.
                    let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
                    if ready <= 0 {
                        continue;
                    }
                    match (&*input).read(&mut buf) {
                        Ok(n) if n > 0 => {
                            let at = Instant::now()
                                + Duration::from_micros(delay.load(Ordering::Relaxed));
                            if tx.send((at, buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                        _ => return,
                    }
                }
            }));
            let stop_w = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                while !stop_w.load(Ordering::Relaxed) {
                    let Ok((at, packet)) = rx.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    // A packet the other end cannot take is lost, as on a wire.
                    let _ = (&*output).write(&packet);
                }
            }));
        }
        Ok(DelayedLink {
            stop,
            delay_us,
            threads,
        })
    }
}

impl Drop for DelayedLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
