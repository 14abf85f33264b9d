//! KV transports: how a migration's copy runs reach the destination's reserved blocks.
//!
//! A [`Transport`] is the source's end: it copies runs of blocks from the source engine's host
//! regions to the destination, and returns once the bytes are there (for `tcp`: written to the
//! socket in order, so they are applied before any later control message on that connection is
//! read). Every transport refuses a run outside the blocks the destination reserved: `shm`
//! checks before its memcpy, `tcp`'s receiving end ([`DataSink`]) checks every frame before it
//! writes.
//!
//! Frames on a transfer connection: `u32 length (LE) | u8 kind | payload`, kind
//! [`FRAME_CONTROL`] (a protobuf message of the migration protocol) or [`FRAME_DATA`]:
//! `u32 region | u32 first destination block | u32 blocks | u32 0 | bytes`.
//!
//! On an encrypted connection (`LLUMLET_TRANSFER_ENCRYPT`) a data frame's bytes are AES-256-GCM
//! ciphertext followed by their 16-byte tag, bound to the frame's head and data header (which
//! stay readable: the receiver checks them against the reservation before it reads the bytes);
//! control frames are sealed by the control plane's session.

use std::io::{Read, Write};
use std::net::TcpStream;

use crate::aead::{AeadError, FrameKey, TAG};
use crate::kv::MappedRegion;
use crate::runs::BlockRun;

/// A control frame (protobuf).
pub const FRAME_CONTROL: u8 = 1;
/// A data frame (KV bytes for consecutive blocks of one region).
pub const FRAME_DATA: u8 = 2;
/// The largest data payload a sender puts in one frame (whole blocks; at least one block).
/// 1 MiB: on loopback, writes and reads of 256 KiB-1 MiB move 30-50% more than 4 MiB ones
/// (docs/BENCHMARKS.md), and an encrypted frame's buffer stays in the cache.
pub const MAX_DATA_FRAME: usize = 1 << 20;
/// The largest frame a receiver accepts (a data frame carries at least one whole block).
pub const MAX_FRAME: usize = 256 << 20;
/// The largest control frame a receiver accepts: a `Commit` carries the request's serialized
/// state (at most [`crate::mailbox::MAX_STATE_BYTES`]); every other message is far smaller.
pub const MAX_CONTROL_FRAME: usize = crate::mailbox::MAX_STATE_BYTES + (1 << 20);

/// Reads the `len` bytes of a frame into `buf`, growing it as the bytes arrive (a peer that
/// declares a large frame and sends nothing costs nothing).
fn read_body(r: &mut impl Read, buf: &mut Vec<u8>, len: usize) -> Result<(), TransportError> {
    const CHUNK: usize = 256 << 10;
    // A buffer a large frame left behind is given back rather than kept for the connection.
    if buf.capacity() > 2 * len.max(CHUNK) {
        *buf = Vec::new();
    }
    buf.clear();
    // Grown as bytes arrive, exactly: by what already arrived (at least a chunk), never past the
    // frame's length, so a few reallocations and no slack.
    while buf.len() < len {
        let want = (len - buf.len()).min(CHUNK.max(buf.len()));
        buf.reserve_exact(want);
        let got = r.take(want as u64).read_to_end(buf)?;
        if got < want {
            return Err(TransportError::Closed);
        }
    }
    Ok(())
}

/// Checks a frame's declared length against its kind's maximum, before anything is read or
/// allocated for it.
fn check_len(kind: u8, len: usize) -> Result<(), TransportError> {
    let max = if kind == FRAME_CONTROL {
        MAX_CONTROL_FRAME
    } else {
        MAX_FRAME
    };
    if len > max {
        return Err(TransportError::Malformed(format!(
            "frame of {len} bytes (at most {max})"
        )));
    }
    Ok(())
}
const DATA_HEADER: usize = 16;

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Socket I/O.
    #[error("transfer connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection.
    #[error("transfer connection closed by the peer")]
    Closed,
    /// A run outside the destination's reservation or regions.
    #[error("run of {len} blocks at destination block {dst} in region {region} is outside the reservation")]
    OutOfReservation {
        /// Region index.
        region: u32,
        /// First destination block.
        dst: u32,
        /// Blocks.
        len: u32,
    },
    /// A run outside the source's regions.
    #[error("run of {len} blocks at source block {src} is outside the source's regions")]
    OutOfSource {
        /// First source block.
        src: u32,
        /// Blocks.
        len: u32,
    },
    /// Source and destination regions differ in number or block size.
    #[error("KV layouts differ: {0}")]
    Layout(String),
    /// A frame that is not one.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The transport's library failed (UCX, CUDA).
    #[error("{0}")]
    Backend(String),
    /// An encrypted frame that does not authenticate (the connection must end).
    #[error("{0}")]
    Aead(#[from] AeadError),
}

/// The blocks a destination reserved for one migration (the only blocks a run may write).
#[derive(Debug, Clone, Default)]
pub struct ReservedBlocks {
    sorted: Vec<u32>,
}

impl ReservedBlocks {
    /// A reservation of `blocks`.
    pub fn new(blocks: &[u32]) -> ReservedBlocks {
        let mut sorted = blocks.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        ReservedBlocks { sorted }
    }

    /// Whether blocks `dst..dst + len` are all reserved.
    pub fn contains_run(&self, dst: u32, len: u32) -> bool {
        let Some(end) = dst.checked_add(len) else {
            return false;
        };
        // The reservation is sorted and unique: the run is inside iff its first block is there
        // and the block `len - 1` places further is its last.
        match self.sorted.binary_search(&dst) {
            Ok(i) => len > 0 && self.sorted.get(i + len as usize - 1) == Some(&(end - 1)),
            Err(_) => false,
        }
    }
}

/// Checks that two sets of regions can exchange blocks: same count, same block size per region.
pub fn check_layouts(src: &[(u64, u64)], dst: &[(u64, u64)]) -> Result<(), TransportError> {
    if src.len() != dst.len() {
        return Err(TransportError::Layout(format!(
            "{} regions at the source, {} at the destination",
            src.len(),
            dst.len()
        )));
    }
    for (i, (s, d)) in src.iter().zip(dst).enumerate() {
        if s.1 != d.1 {
            return Err(TransportError::Layout(format!(
                "region {i}: block of {} bytes at the source, {} at the destination",
                s.1, d.1
            )));
        }
    }
    Ok(())
}

pub(crate) fn check_src(src: &MappedRegion, r: &BlockRun) -> Result<(), TransportError> {
    let end = u64::from(r.src) + u64::from(r.len);
    if r.len == 0 || end > src.region().num_blocks {
        return Err(TransportError::OutOfSource {
            src: r.src,
            len: r.len,
        });
    }
    Ok(())
}

/// The source's end of a transport.
pub trait Transport: Send {
    /// `shm`, `tcp`, ...
    fn name(&self) -> &'static str;
    /// Copies `runs` from every region of `src` to the same region at the destination; returns
    /// the bytes copied.
    fn copy(&mut self, src: &[MappedRegion], runs: &[BlockRun]) -> Result<u64, TransportError>;
    /// The destination widened its reservation (a transport that checks at the source keeps
    /// it; `tcp` is checked by the receiving end).
    fn set_reserved(&mut self, _reserved: ReservedBlocks) {}
}

/// Same host: the destination's regions mapped here, one memcpy per run and region.
pub struct ShmTransport {
    dst: Vec<MappedRegion>,
    reserved: ReservedBlocks,
}

impl ShmTransport {
    /// A transport writing to `dst` (the destination's regions, mapped for this migration only)
    /// within `reserved`.
    pub fn new(dst: Vec<MappedRegion>, reserved: ReservedBlocks) -> ShmTransport {
        ShmTransport { dst, reserved }
    }
}

impl Transport for ShmTransport {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn set_reserved(&mut self, reserved: ReservedBlocks) {
        self.reserved = reserved;
    }

    fn copy(&mut self, src: &[MappedRegion], runs: &[BlockRun]) -> Result<u64, TransportError> {
        check_layouts(&layout(src), &layout(&self.dst))?;
        let mut bytes = 0;
        for r in runs {
            for s in src {
                check_src(s, r)?;
            }
            if !self.reserved.contains_run(r.dst, r.len) {
                return Err(TransportError::OutOfReservation {
                    region: 0,
                    dst: r.dst,
                    len: r.len,
                });
            }
        }
        for (i, (s, d)) in src.iter().zip(&self.dst).enumerate() {
            for r in runs {
                let bad = || TransportError::OutOfReservation {
                    region: i as u32,
                    dst: r.dst,
                    len: r.len,
                };
                let last = u64::from(r.dst) + u64::from(r.len) - 1;
                let (Some(sp), Some(dp), true) = (
                    s.block_ptr(u64::from(r.src)),
                    d.block_ptr(u64::from(r.dst)),
                    last < d.region().num_blocks,
                ) else {
                    return Err(bad());
                };
                let n = r.len as usize * s.region().block_size_bytes as usize;
                // SAFETY: both runs lie inside their mappings (source: `check_src`; destination:
                // last block < num_blocks, and `map` checked num_blocks * block size against the
                // file). Source and destination are different files, so the ranges do not
                // overlap. The source engine may still write its blocks (stale bytes are copied
                // again at a later stage); the destination engine does not touch reserved
                // blocks before the commit. Raw-pointer byte copies, no references.
                unsafe { std::ptr::copy_nonoverlapping(sp, dp, n) };
                bytes += n as u64;
            }
        }
        Ok(bytes)
    }
}

/// (blocks, block size) of each region.
pub fn layout(regions: &[MappedRegion]) -> Vec<(u64, u64)> {
    regions
        .iter()
        .map(|m| (m.region().num_blocks, m.region().block_size_bytes))
        .collect()
}

/// Any two hosts: data frames on the transfer connection.
pub struct TcpTransport {
    stream: TcpStream,
    /// On an encrypted connection: the key of this direction's data frames, and the frame being
    /// sealed (head, payload, tag; the blocks must be copied out of the engine's memory to be
    /// encrypted, so they are copied once, into this buffer, allocated at the first frame).
    sealing: Option<(FrameKey, Vec<u8>)>,
}

impl TcpTransport {
    /// A transport writing to `stream` (a clone of the migration's transfer connection).
    pub fn new(stream: TcpStream) -> TcpTransport {
        TcpTransport {
            stream,
            sealing: None,
        }
    }

    /// A transport writing data frames encrypted with `key` (the session's data key for this
    /// direction) to `stream`.
    pub fn encrypted(stream: TcpStream, key: FrameKey) -> TcpTransport {
        TcpTransport {
            stream,
            sealing: Some((key, Vec::new())),
        }
    }

    /// Sends the blocks at `data` (`len` bytes) as one data frame whose head is `head`: straight
    /// from the engine's memory to the socket, or through the sealing buffer, encrypted.
    ///
    /// # Safety
    /// `data .. data + len` must lie inside a live mapping for the whole call.
    unsafe fn send_frame(
        &mut self,
        head: &mut [u8; 5 + DATA_HEADER],
        data: *const u8,
        len: usize,
    ) -> Result<(), TransportError> {
        let Some((key, frame)) = self.sealing.as_mut() else {
            // SAFETY: the caller's range is live for the call.
            return unsafe { write_head_and_blocks(&self.stream, head, data, len) }
                .map_err(Into::into);
        };
        let payload = (DATA_HEADER + len + TAG) as u32;
        head[..4].copy_from_slice(&payload.to_le_bytes());
        frame.clear();
        frame.extend_from_slice(head);
        let start = frame.len();
        frame.resize(start + len, 0);
        // SAFETY: the caller's range is readable for `len` bytes; the destination is this
        // buffer's own `len` bytes after the head. The engine may be writing those blocks while
        // a stage copies them (the next stage resends what changed): the copy goes through raw
        // pointers, never a reference to the engine's memory.
        unsafe { std::ptr::copy_nonoverlapping(data, frame[start..].as_mut_ptr(), len) };
        let (aad, body) = frame.split_at_mut(start);
        let tag = key.seal(aad, body)?;
        frame.extend_from_slice(&tag);
        (&self.stream).write_all(frame)?;
        Ok(())
    }
}

/// Writes `head`, then the `len` bytes at `data`, to `stream` with `writev`: the blocks go from
/// the engine's mapping to the socket without a copy in between. The blocks are passed to the
/// kernel as a raw pointer, never as a Rust reference: the engine may be writing them while a
/// stage copies them (the next stage resends what changed).
///
/// # Safety
/// `data .. data + len` must lie inside a live mapping for the whole call.
unsafe fn write_head_and_blocks(
    stream: &TcpStream,
    head: &[u8],
    data: *const u8,
    len: usize,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (mut head_done, mut data_done) = (0usize, 0usize);
    while head_done < head.len() || data_done < len {
        let iov = [
            libc::iovec {
                iov_base: head[head_done..].as_ptr() as *mut libc::c_void,
                iov_len: head.len() - head_done,
            },
            libc::iovec {
                // SAFETY: data_done <= len, so the pointer stays inside the caller's range.
                iov_base: unsafe { data.add(data_done) } as *mut libc::c_void,
                iov_len: len - data_done,
            },
        ];
        let first = usize::from(head_done == head.len());
        // SAFETY: both iovecs describe readable memory (our `head`, and the caller's range);
        // the kernel only reads them; the fd is the stream's, open for the whole call.
        let n = unsafe {
            libc::writev(
                stream.as_raw_fd(),
                iov[first..].as_ptr(),
                (iov.len() - first) as libc::c_int,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        let h = n.min(head.len() - head_done);
        head_done += h;
        n -= h;
        data_done += n;
    }
    Ok(())
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn copy(&mut self, src: &[MappedRegion], runs: &[BlockRun]) -> Result<u64, TransportError> {
        let mut bytes = 0;
        for (i, s) in src.iter().enumerate() {
            let bsz = s.region().block_size_bytes as usize;
            let per_frame = (MAX_DATA_FRAME / bsz.max(1)).max(1) as u32;
            for r in runs {
                check_src(s, r)?;
                let mut done = 0u32;
                while done < r.len {
                    let n = per_frame.min(r.len - done);
                    let len = n as usize * bsz;
                    let mut head = [0u8; 5 + DATA_HEADER];
                    let payload = (DATA_HEADER + len) as u32;
                    head[..4].copy_from_slice(&payload.to_le_bytes());
                    head[4] = FRAME_DATA;
                    for (k, w) in [i as u32, r.dst + done, n, 0].into_iter().enumerate() {
                        head[5 + 4 * k..9 + 4 * k].copy_from_slice(&w.to_le_bytes());
                    }
                    let sp = s.block_ptr(u64::from(r.src + done)).ok_or(
                        TransportError::OutOfSource {
                            src: r.src,
                            len: r.len,
                        },
                    )?;
                    // SAFETY: blocks src+done .. src+done+n lie inside the mapping
                    // (`check_src`), which `src` keeps alive for the whole call.
                    unsafe { self.send_frame(&mut head, sp, len) }?;
                    bytes += len as u64;
                    done += n;
                }
            }
        }
        Ok(bytes)
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> Result<(), TransportError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l as usize <= MAX_FRAME)
        .ok_or_else(|| TransportError::Malformed(format!("frame of {} bytes", payload.len())))?;
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4] = kind;
    w.write_all(&head)?;
    w.write_all(payload)?;
    Ok(())
}

/// Reads one frame into `buf`; returns its kind. A clean end of stream before a frame is
/// [`TransportError::Closed`].
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<u8, TransportError> {
    let mut head = [0u8; 5];
    if let Err(e) = r.read_exact(&mut head) {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            TransportError::Closed
        } else {
            e.into()
        });
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if head[4] != FRAME_CONTROL && head[4] != FRAME_DATA {
        return Err(TransportError::Malformed(format!("frame kind {}", head[4])));
    }
    check_len(head[4], len)?;
    read_body(r, buf, len)?;
    Ok(head[4])
}

/// What [`receive_frame`] read.
#[derive(Debug)]
pub enum Frame {
    /// A control frame; its payload is in the buffer.
    Control,
    /// A data frame, written into the reserved blocks (bytes), or refused before anything was
    /// written (its bytes were read and dropped, so the stream stays framed).
    Data(Result<u64, TransportError>),
}

fn eof_is_closed(e: std::io::Error) -> TransportError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        TransportError::Closed
    } else {
        e.into()
    }
}

/// Reads and drops `len` bytes of a refused frame, through a small buffer.
fn discard(r: &mut impl Read, len: usize) -> Result<(), TransportError> {
    let got = std::io::copy(&mut r.take(len as u64), &mut std::io::sink())?;
    if got < len as u64 {
        return Err(TransportError::Closed);
    }
    Ok(())
}

/// Reads one frame at the destination: a control frame into `buf`; a data frame's header is
/// checked against `sink`'s reservation and regions first, then its bytes are read from the
/// socket straight into the KV cache (no intermediate copy).
pub fn receive_frame(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    sink: &DataSink,
) -> Result<Frame, TransportError> {
    receive_frame_keyed(r, buf, sink, None)
}

/// [`receive_frame`] on a connection whose data frames are encrypted with `data_key` (when
/// given): the bytes are read straight into the reserved blocks and decrypted there; a frame
/// that does not authenticate is an error that ends the connection (its blocks hold bytes no
/// one uses: they stay reserved until the migration aborts).
pub fn receive_frame_keyed(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    sink: &DataSink,
    mut data_key: Option<&mut FrameKey>,
) -> Result<Frame, TransportError> {
    let mut head = [0u8; 5 + DATA_HEADER];
    r.read_exact(&mut head[..5]).map_err(eof_is_closed)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    check_len(head[4], len)?;
    match head[4] {
        FRAME_CONTROL => {
            read_body(r, buf, len)?;
            Ok(Frame::Control)
        }
        FRAME_DATA => {
            let tag = if data_key.is_some() { TAG } else { 0 };
            if len < DATA_HEADER + tag {
                discard(r, len)?;
                return Ok(Frame::Data(Err(TransportError::Malformed(
                    "data frame shorter than its header".into(),
                ))));
            }
            r.read_exact(&mut head[5..]).map_err(eof_is_closed)?;
            let body = len - DATA_HEADER - tag;
            match sink.target(&head[5..], body) {
                Ok(dp) => {
                    // SAFETY: `target` checked that `body` bytes from `dp` are reserved blocks
                    // inside the mapping (bounds checked against the region, which `map` checked
                    // against the file). The engine does not touch reserved blocks before the
                    // commit and this thread is their only writer, so the slice is not aliased.
                    let dst = unsafe { std::slice::from_raw_parts_mut(dp, body) };
                    r.read_exact(dst).map_err(eof_is_closed)?;
                    if let Some(key) = data_key.as_mut() {
                        let mut t = [0u8; TAG];
                        r.read_exact(&mut t).map_err(eof_is_closed)?;
                        key.open(&head, dst, &t)?;
                    }
                    Ok(Frame::Data(Ok(body as u64)))
                }
                Err(e) => {
                    discard(r, body + tag)?;
                    if let Some(key) = data_key.as_mut() {
                        // The frame's nonce is used up unread: the next frame is counted on.
                        key.skip();
                    }
                    Ok(Frame::Data(Err(e)))
                }
            }
        }
        kind => Err(TransportError::Malformed(format!("frame kind {kind}"))),
    }
}

/// The destination's end of `tcp`: applies data frames to its regions within the reservation.
pub struct DataSink {
    regions: Vec<MappedRegion>,
    reserved: ReservedBlocks,
}

impl DataSink {
    /// A sink writing to `regions` within `reserved`.
    pub fn new(regions: Vec<MappedRegion>, reserved: ReservedBlocks) -> DataSink {
        DataSink { regions, reserved }
    }

    /// Widens the reservation.
    pub fn set_reserved(&mut self, reserved: ReservedBlocks) {
        self.reserved = reserved;
    }

    /// The regions.
    pub fn regions(&self) -> &[MappedRegion] {
        &self.regions
    }

    /// Checks a data frame's header against the reservation and the regions, for a body of
    /// `body` bytes; returns where the body goes.
    fn target(&self, header: &[u8], body: usize) -> Result<*mut u8, TransportError> {
        let word = |i: usize| {
            header
                .get(4 * i..4 * i + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| {
                    TransportError::Malformed("data frame shorter than its header".into())
                })
        };
        let (region, dst, len) = (word(0)?, word(1)?, word(2)?);
        let bad = TransportError::OutOfReservation { region, dst, len };
        let Some(d) = self.regions.get(region as usize) else {
            return Err(bad);
        };
        if !self.reserved.contains_run(dst, len)
            || u64::from(dst) + u64::from(len) > d.region().num_blocks
        {
            return Err(bad);
        }
        let expect = u64::from(len) * d.region().block_size_bytes;
        if body as u64 != expect {
            return Err(TransportError::Malformed(format!(
                "data frame for {len} blocks carries {body} bytes, not {expect}"
            )));
        }
        d.block_ptr(u64::from(dst)).ok_or(bad)
    }

    /// Checks and applies one data frame's payload (header and bytes); returns the bytes
    /// written. [`receive_frame`] does the same straight from a socket.
    pub fn apply(&self, payload: &[u8]) -> Result<u64, TransportError> {
        let header = payload.get(..DATA_HEADER).ok_or_else(|| {
            TransportError::Malformed("data frame shorter than its header".into())
        })?;
        let bytes = &payload[DATA_HEADER..];
        let dp = self.target(header, bytes.len())?;
        // SAFETY: `target` checked that `bytes.len()` bytes from `dp` are reserved blocks inside
        // the mapping (bounds checked against the region, which `map` checked against the file);
        // `bytes` is our buffer, not shared memory. The engine does not touch reserved blocks
        // before the commit.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dp, bytes.len()) };
        Ok(bytes.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_runs() {
        let r = ReservedBlocks::new(&[9, 3, 4, 5, 10]);
        assert!(r.contains_run(3, 3));
        assert!(r.contains_run(9, 2));
        assert!(!r.contains_run(4, 3), "6 is not reserved");
        assert!(!r.contains_run(5, 5), "a hole between 5 and 9");
        assert!(!r.contains_run(3, 0));
        assert!(!r.contains_run(u32::MAX, 2));
        assert!(!r.contains_run(0, 1));
    }

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let mut wire = Vec::new();
        write_frame(&mut wire, FRAME_CONTROL, b"hello").unwrap();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut &wire[..], &mut buf).unwrap(), FRAME_CONTROL);
        assert_eq!(buf, b"hello");
        assert!(matches!(
            read_frame(&mut &wire[..3], &mut buf),
            Err(TransportError::Closed)
        ));
        assert!(matches!(
            read_frame(&mut &wire[..7], &mut buf),
            Err(TransportError::Closed)
        ));
        let mut bad = wire.clone();
        bad[4] = 9;
        assert!(matches!(
            read_frame(&mut &bad[..], &mut buf),
            Err(TransportError::Malformed(_))
        ));
        let mut huge = wire.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &huge[..], &mut buf),
            Err(TransportError::Malformed(_))
        ));
    }

    /// A peer that declares a large frame and then sends little or nothing makes the receiver
    /// allocate only what arrived; a control frame beyond its kind's maximum is refused unread.
    #[test]
    fn declared_lengths_allocate_nothing_before_the_bytes_arrive() {
        let declared = (MAX_CONTROL_FRAME - 1) as u32;
        let mut wire = declared.to_le_bytes().to_vec();
        wire.push(FRAME_CONTROL);
        wire.extend_from_slice(&[7; 100]);
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut &wire[..], &mut buf),
            Err(TransportError::Closed)
        ));
        assert!(
            buf.capacity() < 1 << 20,
            "{} bytes allocated",
            buf.capacity()
        );
        let sink = DataSink::new(Vec::new(), ReservedBlocks::default());
        let mut buf = Vec::new();
        assert!(matches!(
            receive_frame(&mut &wire[..], &mut buf, &sink),
            Err(TransportError::Closed)
        ));
        assert!(
            buf.capacity() < 1 << 20,
            "{} bytes allocated",
            buf.capacity()
        );
        let mut over = ((MAX_CONTROL_FRAME + 1) as u32).to_le_bytes().to_vec();
        over.push(FRAME_CONTROL);
        assert!(matches!(
            read_frame(&mut &over[..], &mut buf),
            Err(TransportError::Malformed(_))
        ));
        // A refused data frame (no reservation) is read through and dropped, not buffered.
        let body = 8 << 20;
        let mut data = ((DATA_HEADER + body) as u32).to_le_bytes().to_vec();
        data.push(FRAME_DATA);
        data.extend_from_slice(&[0; DATA_HEADER]);
        data.resize(data.len() + body, 1);
        let mut buf = Vec::new();
        let f = receive_frame(&mut &data[..], &mut buf, &sink).unwrap();
        assert!(matches!(f, Frame::Data(Err(_))));
        assert!(
            buf.capacity() < 1 << 20,
            "{} bytes allocated",
            buf.capacity()
        );
    }
}
