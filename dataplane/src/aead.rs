//! Authenticated encryption of transfer frames, for clusters that turn it on
//! (`LLUMLET_TRANSFER_ENCRYPT`): AES-256-GCM from `ring`, one key per direction and kind of
//! frame, derived by the handshake (the control plane's `migration::auth`), with the frame's
//! sequence number as the nonce.
//!
//! A [`FrameKey`] seals or opens the frames of one direction in order: both ends count the frames,
//! so a frame dropped, replayed or moved fails to open, as does any changed byte of its payload or
//! of the bytes it is bound to (its header). Keys are fresh for every connection (both ends'
//! nonces and an ephemeral key exchange go into them), so a nonce is never used twice with one
//! key.

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, NONCE_LEN};

/// Bytes of a frame's authentication tag.
pub const TAG: usize = 16;
/// Bytes of a frame key.
pub const KEY: usize = 32;

/// Why a frame could not be sealed or opened. Says nothing about the key or the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AeadError {
    /// The frame, or the header bound to it, is not the one the peer sealed next (changed,
    /// replayed, reordered or dropped on the way), or was sealed with another key.
    #[error("an encrypted frame failed its authentication (altered, replayed or out of order)")]
    Forged,
    /// This direction has sealed as many frames as its nonces allow (2^64: never in practice).
    #[error("the connection's frame counter is exhausted")]
    Exhausted,
}

/// The key of one direction and kind of frame, with its frame counter (which the keys of one
/// direction share: [`FrameKey::sharing_counter`]).
pub struct FrameKey {
    key: LessSafeKey,
    seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FrameKey(frame {})",
            self.seq.load(std::sync::atomic::Ordering::Relaxed)
        )
    }
}

impl FrameKey {
    /// A key from 32 bytes the handshake derived; frames are counted from 0.
    pub fn new(key: &[u8; KEY]) -> FrameKey {
        FrameKey {
            key: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key).expect("AES-256-GCM takes a 32-byte key"),
            ),
            seq: Default::default(),
        }
    }

    /// A key from 32 bytes that counts its frames with `other`'s counter: the control and data
    /// frames of one direction are one sequence, so a frame of either kind dropped, held back or
    /// moved past one of the other kind fails to open (a `StageDone` cannot overtake its data).
    pub fn sharing_counter(key: &[u8; KEY], other: &FrameKey) -> FrameKey {
        FrameKey {
            seq: std::sync::Arc::clone(&other.seq),
            ..FrameKey::new(key)
        }
    }

    fn next_nonce(&mut self) -> Result<Nonce, AeadError> {
        use std::sync::atomic::Ordering;
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(
            seq.checked_add(1).ok_or(AeadError::Exhausted)?,
            Ordering::Relaxed,
        );
        let mut n = [0u8; NONCE_LEN];
        n[NONCE_LEN - 8..].copy_from_slice(&seq.to_be_bytes());
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Counts a frame that was dropped unread (refused before its bytes were used): the next
    /// frame opens with the next nonce, as its sealer used it.
    pub fn skip(&mut self) {
        use std::sync::atomic::Ordering;
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.saturating_add(1), Ordering::Relaxed);
    }

    /// Encrypts the next frame's payload `buf` in place, bound to `aad` (its header); returns
    /// the tag to send after it.
    pub fn seal(&mut self, aad: &[u8], buf: &mut [u8]) -> Result<[u8; TAG], AeadError> {
        let nonce = self.next_nonce()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(aad), buf)
            .map_err(|_| AeadError::Forged)?;
        let mut t = [0u8; TAG];
        t.copy_from_slice(tag.as_ref());
        Ok(t)
    }

    /// Decrypts the next frame's payload `buf` in place if `tag` authenticates it and `aad`;
    /// otherwise `buf` holds bytes no one may use, and the connection must end.
    pub fn open(&mut self, aad: &[u8], buf: &mut [u8], tag: &[u8]) -> Result<(), AeadError> {
        let nonce = self.next_nonce()?;
        let tag = Tag::try_from(tag).map_err(|_| AeadError::Forged)?;
        self.key
            .open_in_place_separate_tag(nonce, Aad::from(aad), tag, buf, 0..)
            .map(|_| ())
            .map_err(|_| AeadError::Forged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (FrameKey, FrameKey) {
        let k = [7u8; KEY];
        (FrameKey::new(&k), FrameKey::new(&k))
    }

    #[test]
    fn frames_open_in_order_and_hide_their_bytes() {
        let (mut tx, mut rx) = pair();
        for n in 0..3u8 {
            let plain = vec![n; 4096];
            let mut buf = plain.clone();
            let tag = tx.seal(b"head", &mut buf).unwrap();
            assert_ne!(buf, plain, "the payload is encrypted");
            rx.open(b"head", &mut buf, &tag).unwrap();
            assert_eq!(buf, plain);
        }
    }

    #[test]
    fn a_changed_byte_header_or_order_fails_to_open() {
        let seal = |tx: &mut FrameKey, n: u8| {
            let mut b = vec![n; 64];
            let t = tx.seal(b"head", &mut b).unwrap();
            (b, t)
        };
        // A changed payload byte.
        let (mut tx, mut rx) = pair();
        let (mut b, t) = seal(&mut tx, 1);
        b[10] ^= 1;
        assert_eq!(rx.open(b"head", &mut b, &t), Err(AeadError::Forged));
        // A changed header.
        let (mut tx, mut rx) = pair();
        let (mut b, t) = seal(&mut tx, 1);
        assert_eq!(rx.open(b"hea!", &mut b, &t), Err(AeadError::Forged));
        // A dropped frame: the next one does not open in its place.
        let (mut tx, mut rx) = pair();
        let _ = seal(&mut tx, 1);
        let (mut b, t) = seal(&mut tx, 2);
        assert_eq!(rx.open(b"head", &mut b, &t), Err(AeadError::Forged));
        // A replayed frame.
        let (mut tx, mut rx) = pair();
        let (b, t) = seal(&mut tx, 1);
        rx.open(b"head", &mut b.clone(), &t).unwrap();
        assert_eq!(rx.open(b"head", &mut b.clone(), &t), Err(AeadError::Forged));
        // Another key, and a short tag.
        let mut other = FrameKey::new(&[8u8; KEY]);
        let (mut tx, _) = pair();
        let (mut b, t) = seal(&mut tx, 1);
        assert_eq!(other.open(b"head", &mut b, &t), Err(AeadError::Forged));
        let (mut tx, mut rx) = pair();
        let (mut b, t) = seal(&mut tx, 1);
        assert_eq!(rx.open(b"head", &mut b, &t[..8]), Err(AeadError::Forged));
    }
}
