//! Copy runs: a migration's block pairs (source block, destination block) turned into runs of
//! consecutive blocks on both sides, so a transport sees few large copies instead of one per block.

/// `len` blocks starting at `src` in the source's regions go to `dst` in the destination's. The
/// same run applies to every region (layer): block ids are shared across layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRun {
    /// First source block.
    pub src: u32,
    /// First destination block.
    pub dst: u32,
    /// Blocks.
    pub len: u32,
}

/// Appends to `out` the runs copying table positions `positions` (ascending or not) of `src`
/// to the same positions of `dst`, coalescing neighbours that are consecutive on both sides.
/// Positions outside either table are ignored (the caller bounds-checks the tables first).
pub fn coalesce(
    src: &[u32],
    dst: &[u32],
    positions: impl IntoIterator<Item = usize>,
    out: &mut Vec<BlockRun>,
) {
    let mut cur: Option<BlockRun> = None;
    for p in positions {
        let (Some(&s), Some(&d)) = (src.get(p), dst.get(p)) else {
            continue;
        };
        match cur.as_mut() {
            Some(r)
                if r.src.checked_add(r.len) == Some(s) && r.dst.checked_add(r.len) == Some(d) =>
            {
                r.len += 1
            }
            _ => {
                out.extend(cur.take());
                cur = Some(BlockRun {
                    src: s,
                    dst: d,
                    len: 1,
                });
            }
        }
    }
    out.extend(cur);
}

/// Blocks covered by `runs`.
pub fn blocks(runs: &[BlockRun]) -> u64 {
    runs.iter().map(|r| u64::from(r.len)).sum()
}

/// Which table positions a stage must copy: those whose block changed since the last stage
/// (`copied` holds the source block copied at each position), every position beyond, and the
/// last position copied before if it was not full then (tokens are appended in place).
pub fn delta_positions(
    copied: &[u32],
    copied_tokens: u64,
    now: &[u32],
    block_tokens: u32,
) -> Vec<usize> {
    let bt = u64::from(block_tokens.max(1));
    // Positions up to `full` were complete when copied; later ones may have grown since.
    let full = (copied_tokens / bt) as usize;
    (0..now.len())
        .filter(|&p| p >= full.min(copied.len()) || copied.get(p) != Some(&now[p]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_pairs_coalesce() {
        let src = [4, 5, 6, 9, 10, 2];
        let dst = [7, 8, 9, 10, 20, 21];
        let mut out = Vec::new();
        coalesce(&src, &dst, 0..src.len(), &mut out);
        assert_eq!(
            out,
            vec![
                BlockRun {
                    src: 4,
                    dst: 7,
                    len: 3
                },
                BlockRun {
                    src: 9,
                    dst: 10,
                    len: 1
                },
                BlockRun {
                    src: 10,
                    dst: 20,
                    len: 1
                },
                BlockRun {
                    src: 2,
                    dst: 21,
                    len: 1
                },
            ]
        );
        assert_eq!(blocks(&out), 6);
        out.clear();
        coalesce(&src, &dst, [0, 2, 7], &mut out);
        assert_eq!(
            out,
            vec![
                BlockRun {
                    src: 4,
                    dst: 7,
                    len: 1
                },
                BlockRun {
                    src: 6,
                    dst: 9,
                    len: 1
                }
            ],
            "a gap breaks a run; positions beyond the tables are ignored"
        );
        out.clear();
        coalesce(&[u32::MAX, 0], &[u32::MAX, 0], 0..2, &mut out);
        assert_eq!(out.len(), 2, "no overflow at the top of the id space");
    }

    #[test]
    fn deltas_hold_changed_grown_and_new_blocks() {
        // 16 tokens per block; 40 tokens copied over blocks [3, 4, 5] (block 5 partly full).
        let copied = [3, 4, 5];
        assert_eq!(delta_positions(&copied, 40, &[3, 4, 5], 16), vec![2]);
        assert_eq!(delta_positions(&copied, 40, &[3, 4, 5, 8], 16), vec![2, 3]);
        // Block 4 replaced (preempted and recomputed elsewhere).
        assert_eq!(delta_positions(&copied, 48, &[3, 9, 5, 8], 16), vec![1, 3]);
        // Nothing copied yet: everything.
        assert_eq!(delta_positions(&[], 0, &[1, 2], 16), vec![0, 1]);
    }
}
