//! Layer paths: which block passes a request runs, in order.
//!
//! A path is a sequence of block indices, e.g. `0 1 2 3 3 5 6 ...` (block 4 skipped, block 3 run
//! twice). Every occurrence of a block is one *pass*; the k-th occurrence of block b uses the KV
//! slot (b, k), so a repeated block keeps a separate cache per pass.

use std::fmt;

/// Most passes one block may get in a path (the method uses at most 2; 4 leaves room for
/// experiments while bounding KV memory).
pub const MAX_PASSES_PER_BLOCK: usize = 4;

/// An invalid path.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathError {
    /// A block index is not below the model's block count.
    BlockOutOfRange { block: usize, n_layer: usize },
    /// A block occurs more often than [`MAX_PASSES_PER_BLOCK`].
    TooManyPasses { block: usize, passes: usize },
    /// The textual spec could not be parsed.
    Syntax(String),
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::BlockOutOfRange { block, n_layer } => {
                write!(f, "block {block} does not exist (the model has blocks 0..{n_layer})")
            }
            PathError::TooManyPasses { block, passes } => write!(
                f,
                "block {block} occurs {passes} times; at most {MAX_PASSES_PER_BLOCK} passes per block"
            ),
            PathError::Syntax(s) => write!(f, "{s}"),
        }
    }
}

impl std::error::Error for PathError {}

/// One pass of a path: the block it runs and which pass of that block it is (0 = first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pass {
    /// Block index.
    pub block: usize,
    /// Occurrence of this block so far in the path (selects the KV slot).
    pub pass: usize,
}

/// A validated layer path for a model with `n_layer` blocks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerPath {
    blocks: Vec<u16>,
    n_layer: usize,
}

impl LayerPath {
    /// Every block once, in order (the plain model).
    pub fn full(n_layer: usize) -> Self {
        LayerPath {
            blocks: (0..n_layer).map(|b| b as u16).collect(),
            n_layer,
        }
    }

    /// A path from an explicit block sequence.
    pub fn new(blocks: &[usize], n_layer: usize) -> Result<Self, PathError> {
        let mut counts = vec![0usize; n_layer];
        let mut out = Vec::with_capacity(blocks.len());
        for &b in blocks {
            if b >= n_layer || b > u16::MAX as usize {
                return Err(PathError::BlockOutOfRange { block: b, n_layer });
            }
            counts[b] += 1;
            if counts[b] > MAX_PASSES_PER_BLOCK {
                return Err(PathError::TooManyPasses {
                    block: b,
                    passes: counts[b],
                });
            }
            out.push(b as u16);
        }
        Ok(LayerPath {
            blocks: out,
            n_layer,
        })
    }

    /// The in-order path with `counts[b]` passes of block b (0 = skip, 1 = execute, 2 = repeat).
    pub fn from_counts(counts: &[usize]) -> Result<Self, PathError> {
        let mut blocks = Vec::new();
        for (b, &c) in counts.iter().enumerate() {
            if c > MAX_PASSES_PER_BLOCK {
                return Err(PathError::TooManyPasses {
                    block: b,
                    passes: c,
                });
            }
            blocks.extend(std::iter::repeat_n(b, c));
        }
        LayerPath::new(&blocks, counts.len())
    }

    /// Parses a textual spec for a model with `n_layer` blocks:
    /// - `full` (or `all`): every block once;
    /// - a list of block indices and inclusive ranges, separated by commas or spaces:
    ///   `0-3,3,5-29` (block 3 twice, block 4 skipped);
    /// - edits of the full path: `skip=4,7 repeat=3` (also `skip:4`; ranges allowed).
    pub fn parse(spec: &str, n_layer: usize) -> Result<Self, PathError> {
        let s = spec.trim();
        if s.is_empty() {
            return Err(PathError::Syntax("empty path spec".into()));
        }
        if s == "full" || s == "all" {
            return Ok(LayerPath::full(n_layer));
        }
        if s.contains("skip") || s.contains("repeat") {
            let mut counts = vec![1usize; n_layer];
            for part in s.split(|c: char| c.is_whitespace() || c == ';') {
                if part.is_empty() {
                    continue;
                }
                let (key, list) = part.split_once(['=', ':']).ok_or_else(|| {
                    PathError::Syntax(format!("expected skip=LIST or repeat=LIST, got '{part}'"))
                })?;
                let blocks = parse_list(list, n_layer)?;
                match key {
                    "skip" => blocks.iter().for_each(|&b| counts[b] = 0),
                    "repeat" => blocks.iter().for_each(|&b| counts[b] = 2),
                    other => {
                        return Err(PathError::Syntax(format!(
                            "unknown path edit '{other}' (expected skip or repeat)"
                        )))
                    }
                }
            }
            return LayerPath::from_counts(&counts);
        }
        let blocks = parse_list(s, n_layer)?;
        LayerPath::new(&blocks, n_layer)
    }

    /// Block indices in execution order.
    pub fn blocks(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.blocks.iter().map(|&b| b as usize)
    }

    /// The passes in execution order, with their per-block pass index (KV slot).
    pub fn passes(&self) -> Vec<Pass> {
        let mut seen = vec![0usize; self.n_layer];
        self.blocks
            .iter()
            .map(|&b| {
                let b = b as usize;
                let p = Pass {
                    block: b,
                    pass: seen[b],
                };
                seen[b] += 1;
                p
            })
            .collect()
    }

    /// Number of block passes executed per token.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True when the path runs no block at all.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Block count of the model this path is for.
    pub fn n_layer(&self) -> usize {
        self.n_layer
    }

    /// Passes per block (0 skip, 1 execute, 2 repeat, ...).
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0usize; self.n_layer];
        for &b in &self.blocks {
            c[b as usize] += 1;
        }
        c
    }

    /// True when every block runs exactly once, in order.
    pub fn is_full(&self) -> bool {
        self.blocks.len() == self.n_layer
            && self
                .blocks
                .iter()
                .enumerate()
                .all(|(i, &b)| i == b as usize)
    }

    /// Blocks that are skipped.
    pub fn skipped(&self) -> Vec<usize> {
        self.counts()
            .iter()
            .enumerate()
            .filter(|(_, &c)| c == 0)
            .map(|(b, _)| b)
            .collect()
    }

    /// Blocks that run more than once.
    pub fn repeated(&self) -> Vec<usize> {
        self.counts()
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 1)
            .map(|(b, _)| b)
            .collect()
    }
}

/// Compact form: runs of consecutive ascending blocks as ranges, e.g. `0-3,3,5-29`.
impl fmt::Display for LayerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.blocks.is_empty() {
            return write!(f, "(empty)");
        }
        let mut parts = Vec::new();
        let mut i = 0;
        while i < self.blocks.len() {
            let start = self.blocks[i];
            let mut j = i;
            while j + 1 < self.blocks.len() && self.blocks[j + 1] == self.blocks[j] + 1 {
                j += 1;
            }
            if j == i {
                parts.push(format!("{start}"));
            } else {
                parts.push(format!("{start}-{}", self.blocks[j]));
            }
            i = j + 1;
        }
        write!(f, "{}", parts.join(","))
    }
}

fn parse_list(s: &str, n_layer: usize) -> Result<Vec<usize>, PathError> {
    let mut out = Vec::new();
    for item in s.split(|c: char| c == ',' || c.is_whitespace()) {
        if item.is_empty() {
            continue;
        }
        let num = |t: &str| -> Result<usize, PathError> {
            t.trim()
                .parse::<usize>()
                .map_err(|_| PathError::Syntax(format!("'{t}' is not a block index")))
        };
        if let Some((a, b)) = item.split_once('-') {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(PathError::Syntax(format!("descending range '{item}'")));
            }
            if b >= n_layer {
                return Err(PathError::BlockOutOfRange { block: b, n_layer });
            }
            out.extend(a..=b);
        } else {
            let b = num(item)?;
            if b >= n_layer {
                return Err(PathError::BlockOutOfRange { block: b, n_layer });
            }
            out.push(b);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        let p = LayerPath::parse("0-3,3,5-7", 8).unwrap();
        assert_eq!(p.blocks().collect::<Vec<_>>(), vec![0, 1, 2, 3, 3, 5, 6, 7]);
        assert_eq!(p.to_string(), "0-3,3,5-7");
        assert_eq!(p.skipped(), vec![4]);
        assert_eq!(p.repeated(), vec![3]);
        let q = LayerPath::parse("skip=4 repeat=3", 8).unwrap();
        assert_eq!(p, q);
        assert!(LayerPath::parse("full", 8).unwrap().is_full());
        assert_eq!(LayerPath::parse("0 1 2", 3).unwrap(), LayerPath::full(3));
        let passes = p.passes();
        assert_eq!(passes[3], Pass { block: 3, pass: 0 });
        assert_eq!(passes[4], Pass { block: 3, pass: 1 });
    }

    #[test]
    fn parse_errors() {
        assert!(matches!(
            LayerPath::parse("0-8", 8),
            Err(PathError::BlockOutOfRange { block: 8, .. })
        ));
        assert!(matches!(
            LayerPath::parse("x", 8),
            Err(PathError::Syntax(_))
        ));
        assert!(matches!(
            LayerPath::parse("3-1", 8),
            Err(PathError::Syntax(_))
        ));
        assert!(matches!(
            LayerPath::parse("1,1,1,1,1", 8),
            Err(PathError::TooManyPasses {
                block: 1,
                passes: 5
            })
        ));
        assert!(matches!(LayerPath::parse("", 8), Err(PathError::Syntax(_))));
        assert!(matches!(
            LayerPath::parse("drop=1", 8),
            Err(PathError::Syntax(_))
        ));
    }
}
