//! Reading an architecture's metadata keys (`<arch>.<name>`) as llama.cpp reads them, and the
//! sliding-window patterns built from them.

use crate::error::{EngineError, Result};
use drllm_gguf::{GgufFile, Value};

/// Metadata keys of one architecture (`<arch>.<name>`), read as llama.cpp reads them.
pub struct Keys<'a> {
    g: &'a GgufFile,
    arch: &'a str,
}

impl<'a> Keys<'a> {
    /// The keys of architecture `arch` in `g`.
    pub(crate) fn new(g: &'a GgufFile, arch: &'a str) -> Self {
        Keys { g, arch }
    }
}

impl Keys<'_> {
    /// The file.
    pub fn file(&self) -> &GgufFile {
        self.g
    }

    /// `<arch>.<name>`.
    pub fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.arch)
    }

    /// A required unsigned value (a scalar, or a per-block array of equal values).
    pub fn req_u(&self, name: &str) -> Result<usize> {
        self.req_u_full(&self.key(name))
    }

    /// An optional unsigned value.
    pub fn opt_u(&self, name: &str) -> Result<Option<usize>> {
        self.opt_u_full(&self.key(name))
    }

    /// An optional float.
    pub fn opt_f(&self, name: &str) -> Result<Option<f32>> {
        self.opt_f_full(&self.key(name))
    }

    fn req_u_full(&self, key: &str) -> Result<usize> {
        let v = self
            .g
            .get(key)
            .ok_or_else(|| EngineError::MissingMetadata {
                key: key.to_string(),
            })?;
        scalar_or_uniform_array(key, v)
    }

    fn opt_u_full(&self, key: &str) -> Result<Option<usize>> {
        match self.g.get(key) {
            None => Ok(None),
            Some(v) => scalar_or_uniform_array(key, v).map(Some),
        }
    }

    fn opt_f_full(&self, key: &str) -> Result<Option<f32>> {
        match self.g.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f32()
                .map(Some)
                .ok_or_else(|| EngineError::BadMetadata {
                    key: key.to_string(),
                    reason: "expected a float".into(),
                }),
        }
    }
}

/// A u32-like scalar, or a per-layer array whose entries are all equal (llama.cpp's get_key_or_arr).
fn scalar_or_uniform_array(key: &str, v: &Value) -> Result<usize> {
    let bad = |reason: &str| EngineError::BadMetadata {
        key: key.to_string(),
        reason: reason.into(),
    };
    match v {
        Value::Array(a) => {
            let mut first = None;
            for e in &a.values {
                let x = e
                    .as_u64()
                    .ok_or_else(|| bad("expected unsigned integers"))?;
                match first {
                    None => first = Some(x),
                    Some(f) if f != x => {
                        return Err(bad("per-block values that differ are not supported"))
                    }
                    _ => {}
                }
            }
            let x = first.ok_or_else(|| bad("empty array"))?;
            usize::try_from(x).map_err(|_| bad("value too large"))
        }
        other => {
            let x = other
                .as_u64()
                .ok_or_else(|| bad("expected an unsigned integer"))?;
            if x > u32::MAX as u64 {
                return Err(bad("value too large"));
            }
            Ok(x as usize)
        }
    }
}

/// Sliding-window pattern as llama.cpp resolves it: a per-block bool array, else a period n
/// (layer il is sliding iff il % n < n - 1), default `default_period`.
pub fn swa_pattern(
    g: &GgufFile,
    key: &str,
    n_layer: usize,
    default_period: usize,
) -> Result<Vec<bool>> {
    let bad = |reason: &str| EngineError::BadMetadata {
        key: key.to_string(),
        reason: reason.into(),
    };
    match g.get(key) {
        Some(Value::Array(a)) => {
            if a.values.len() < n_layer {
                return Err(bad("array shorter than the block count"));
            }
            a.values
                .iter()
                .take(n_layer)
                .map(|v| match v {
                    Value::Bool(b) => Ok(*b),
                    other => other
                        .as_u64()
                        .map(|x| x != 0)
                        .ok_or_else(|| bad("expected booleans")),
                })
                .collect()
        }
        Some(v) => {
            let n = v
                .as_u64()
                .ok_or_else(|| bad("expected an integer or an array"))?
                as usize;
            Ok(period_pattern(n, n_layer))
        }
        None => Ok(period_pattern(default_period, n_layer)),
    }
}

/// Layer il slides iff il % n < n - 1 (every block when n is 0).
fn period_pattern(n: usize, n_layer: usize) -> Vec<bool> {
    (0..n_layer).map(|il| n == 0 || il % n < n - 1).collect()
}
