//! Block-level rewriting of GGUF models (delete / duplicate / reorder transformer blocks).

use std::path::Path;

use drllm_gguf::{GgufFile, GgufWriter, TensorSource, Value, ValueType};

use crate::TestkitError;

/// llama.cpp's `LLAMA_MAX_LAYERS`.
pub const LLAMA_MAX_LAYERS: usize = 512;

/// Default sliding-window period and `dense_first` flag that llama.cpp's
/// `load_swa_pattern(ml, n, dense_first)` uses per architecture when the file has no
/// `<arch>.attention.sliding_window_pattern` key.
pub fn default_swa_pattern(arch: &str) -> Option<(u32, bool)> {
    Some(match arch {
        "gemma3" | "gemma-embedding" => (6, false),
        "gemma3n" => (5, false),
        "gemma2" | "gpt-oss" => (2, false),
        "cohere2" | "exaone4" | "exaone-moe" | "llama4" | "olmo2" | "afmoe" | "mellum"
        | "muse-glimmer" => (4, false),
        "cohere2moe" | "smallthinker" | "laguna" => (4, true),
        "modern-bert" => (3, true),
        "plamo3" => (8, false),
        _ => return None,
    })
}

/// Architectures whose llama.cpp loader disables SWA entirely when
/// `<arch>.attention.sliding_window` is 0 (`found_swa && n_swa > 0`).
const ZERO_WINDOW_DISABLES_SWA: &[&str] = &["gemma3", "olmo2"];

/// llama.cpp's `llama_hparams::set_swa_pattern`: whether layer `il` is sliding-window.
pub fn swa_from_period(il: u32, n_pattern: u32, dense_first: bool) -> bool {
    if n_pattern == 0 {
        return true;
    }
    if dense_first {
        !il.is_multiple_of(n_pattern)
    } else {
        il % n_pattern < n_pattern - 1
    }
}

/// Per-block sliding-window flags exactly as llama.cpp derives them for this file
/// (`load_swa_pattern`): `None` if the file has no `<arch>.attention.sliding_window` key
/// (or, for gemma3/olmo2, the window is 0, which llama.cpp treats as "no SWA").
///
/// If `<arch>.attention.sliding_window_pattern` is an array, entry `il` (nonzero = SWA;
/// missing entries = dense) is used; otherwise the key's integer value, or the
/// architecture's default period, feeds `set_swa_pattern`.
pub fn swa_pattern(f: &GgufFile) -> Result<Option<Vec<bool>>, TestkitError> {
    let arch = f
        .architecture()
        .ok_or_else(|| TestkitError::MissingKey("general.architecture".into()))?;
    let n_layer = block_count(f)?;
    match f.get(&format!("{arch}.attention.sliding_window")) {
        None => return Ok(None),
        Some(v) if v.as_u64() == Some(0) && ZERO_WINDOW_DISABLES_SWA.contains(&arch) => {
            return Ok(None)
        }
        Some(_) => {}
    }
    let key = format!("{arch}.attention.sliding_window_pattern");
    let flags = match f.get(&key) {
        Some(Value::Array(a)) => {
            let mut v = Vec::with_capacity(n_layer as usize);
            for il in 0..n_layer as usize {
                let on = match a.values.get(il) {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(x) => match x.as_i64() {
                        Some(i) => i != 0,
                        None => {
                            return Err(TestkitError::Unsupported(format!(
                                "{key} has element type {}",
                                a.elem_type
                            )))
                        }
                    },
                };
                v.push(on);
            }
            v
        }
        other => {
            let (default_n, dense_first) = default_swa_pattern(arch).ok_or_else(|| {
                TestkitError::Unsupported(format!(
                    "architecture '{arch}' has a sliding window but its default SWA pattern is unknown"
                ))
            })?;
            let n = match other {
                None => default_n,
                Some(v) => v.as_u32().ok_or_else(|| {
                    TestkitError::Unsupported(format!("{key} is not an integer or array"))
                })?,
            };
            (0..n_layer)
                .map(|il| swa_from_period(il, n, dense_first))
                .collect()
        }
    };
    Ok(Some(flags))
}

fn block_count(f: &GgufFile) -> Result<u32, TestkitError> {
    let key = f
        .arch_key("block_count")
        .ok_or_else(|| TestkitError::MissingKey("general.architecture".into()))?;
    f.get_u32(&key).ok_or(TestkitError::MissingKey(key))
}

/// Splits `blk.<N>.<rest>` into `(N, rest)`.
fn split_block_name(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (num, tail) = rest.split_once('.')?;
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((num.parse().ok()?, tail))
}

/// Array keys of length `block_count` that are NOT per-layer and must not be reindexed.
const NOT_PER_LAYER: &[&str] = &["rope.dimension_sections"];

/// Writes `dst` whose block `j` is block `blocks[j]` of `src`.
///
/// * Non-block tensors are copied unchanged; `blk.{blocks[j]}.*` tensors are copied
///   byte-for-byte (streamed) as `blk.{j}.*`.
/// * `<arch>.block_count` becomes `blocks.len()`.
/// * Every `<arch>.*` array whose length equals the old block count (per-layer
///   `head_count`, `feed_forward_length`, ...) is reindexed the same way.
/// * If the file has `<arch>.attention.sliding_window`, the per-output-block SWA flags of
///   the *source* blocks are written as a bool array `<arch>.attention.sliding_window_pattern`
///   (llama.cpp reads bool arrays into its per-layer `is_swa` table).
///
///   llama.cpp aborts the process (`GGML_ASSERT(hparams.is_swa_any())`) when SWA is
///   enabled but no layer is SWA, so if the selected blocks are all dense the window is set
///   to 0 instead (gemma3/olmo2, where that disables SWA with identical results), and other
///   architectures get [`TestkitError::Unsupported`].
///
/// Deleting block `k` = all blocks except `k`; duplicating = listing it twice.
pub fn rewrite_blocks(src: &Path, dst: &Path, blocks: &[u32]) -> Result<(), TestkitError> {
    let f = GgufFile::open(src)?;
    let arch = f
        .architecture()
        .ok_or_else(|| TestkitError::MissingKey("general.architecture".into()))?
        .to_owned();
    let old_n = block_count(&f)?;
    check_blocks(blocks, old_n)?;
    let swa = swa_pattern(&f)?;

    let mut w = GgufWriter::new();
    w.set_alignment(f.alignment);
    copy_metadata(&mut w, &f, &arch, old_n, blocks);
    if let Some(flags) = swa {
        set_swa_flags(&mut w, &arch, &flags, blocks)?;
    }
    copy_tensors(&mut w, &f, src, blocks)?;
    if let Some(t) = f
        .tensors
        .iter()
        .find(|t| split_block_name(&t.name).is_some_and(|(n, _)| n >= old_n))
    {
        return Err(TestkitError::InvalidBlocks(format!(
            "tensor '{}' belongs to a block beyond block_count {old_n}",
            t.name
        )));
    }
    w.write_to_path(dst)?;
    Ok(())
}

/// Between 1 and [`LLAMA_MAX_LAYERS`] blocks, each one of the `old_n` the file has.
fn check_blocks(blocks: &[u32], old_n: u32) -> Result<(), TestkitError> {
    if blocks.is_empty() || blocks.len() > LLAMA_MAX_LAYERS {
        return Err(TestkitError::InvalidBlocks(format!(
            "need between 1 and {LLAMA_MAX_LAYERS} blocks, got {}",
            blocks.len()
        )));
    }
    if let Some(&b) = blocks.iter().find(|&&b| b >= old_n) {
        return Err(TestkitError::InvalidBlocks(format!(
            "block {b} out of range (model has {old_n})"
        )));
    }
    Ok(())
}

/// Every key of `f`, per-layer `<arch>.*` arrays reindexed by `blocks`, and the new block
/// count.
fn copy_metadata(w: &mut GgufWriter, f: &GgufFile, arch: &str, old_n: u32, blocks: &[u32]) {
    let pattern_key = format!("{arch}.attention.sliding_window_pattern");
    let prefix = format!("{arch}.");
    for (key, value) in &f.kv {
        let reindexable = key.starts_with(&prefix)
            && *key != pattern_key
            && !NOT_PER_LAYER.iter().any(|s| key[prefix.len()..] == **s);
        let v = match value {
            Value::Array(a) if reindexable && a.values.len() == old_n as usize => Value::array(
                a.elem_type,
                blocks
                    .iter()
                    .map(|&b| a.values[b as usize].clone())
                    .collect(),
            ),
            other => other.clone(),
        };
        w.set(key.clone(), v);
    }
    w.set(
        format!("{arch}.block_count"),
        Value::U32(blocks.len() as u32),
    );
}

/// The source blocks' sliding-window `flags` as the output's bool pattern (the window set to 0
/// where all selected blocks are dense and the architecture allows it).
fn set_swa_flags(
    w: &mut GgufWriter,
    arch: &str,
    flags: &[bool],
    blocks: &[u32],
) -> Result<(), TestkitError> {
    let out: Vec<bool> = blocks.iter().map(|&b| flags[b as usize]).collect();
    if !out.iter().any(|&s| s) {
        if ZERO_WINDOW_DISABLES_SWA.contains(&arch) {
            w.set(format!("{arch}.attention.sliding_window"), Value::U32(0));
        } else {
            return Err(TestkitError::Unsupported(format!(
                "the selected blocks of this '{arch}' model are all dense; llama.cpp aborts \
                 when SWA is enabled without any SWA layer"
            )));
        }
    }
    let out = out.into_iter().map(Value::Bool).collect();
    w.set(
        format!("{arch}.attention.sliding_window_pattern"),
        Value::array(ValueType::Bool, out),
    );
    Ok(())
}

/// Tensors streamed from `src`: non-block tensors before the first block tensor, then the
/// blocks in their new order, then the rest.
fn copy_tensors(
    w: &mut GgufWriter,
    f: &GgufFile,
    src: &Path,
    blocks: &[u32],
) -> Result<(), TestkitError> {
    let first_block = f
        .tensors
        .iter()
        .position(|t| split_block_name(&t.name).is_some())
        .unwrap_or(f.tensors.len());
    let file_src = |t: &drllm_gguf::TensorInfo| {
        let r = f.tensor_data_range(t);
        TensorSource::File {
            path: src.to_path_buf(),
            offset: r.start,
            len: t.size,
        }
    };
    for t in f.tensors[..first_block]
        .iter()
        .filter(|t| split_block_name(&t.name).is_none())
    {
        w.add_tensor(t.name.clone(), t.dtype, &t.dims, file_src(t))?;
    }
    for (j, &b) in blocks.iter().enumerate() {
        for t in &f.tensors {
            if let Some((n, rest)) = split_block_name(&t.name) {
                if n == b {
                    w.add_tensor(format!("blk.{j}.{rest}"), t.dtype, &t.dims, file_src(t))?;
                }
            }
        }
    }
    for t in f.tensors[first_block..]
        .iter()
        .filter(|t| split_block_name(&t.name).is_none())
    {
        w.add_tensor(t.name.clone(), t.dtype, &t.dims, file_src(t))?;
    }
    Ok(())
}
