//! The sidecar file: reading, validating and writing `MODEL.routers.gguf`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use drllm_gguf::{GgmlType, GgufFile, GgufWriter, Limits, TensorInfo, TensorSource, Value};

use crate::error::FormatError;
use crate::fingerprint::{is_sha256_string, sha256_string, type_name, BaseModel};
use crate::math::BlockRouter;
use crate::{keys, ACTIVATION, ARCHITECTURE, CLASSES, DEFAULT_HIDDEN, DEFAULT_WINDOWS};
use crate::{FORMAT_VERSION, MAX_BLOCKS, MAX_D, MAX_FILE_BYTES, MAX_ROUTER_HIDDEN, MAX_WINDOWS};

/// Longest string value a sidecar may hold (each provenance field, the base architecture).
pub const MAX_STRING_BYTES: u64 = 1 << 20;

/// Shape of every router in a sidecar. The activation is always GELU (tanh approximation)
/// and there are always 3 classes.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterShape {
    /// Width of the router's hidden layer (the reference method uses 128).
    pub hidden: usize,
    /// Maximum number of pooling windows W (the reference method uses 8).
    pub windows: usize,
}

impl Default for RouterShape {
    /// The reference method's shape: hidden 128, 8 windows.
    fn default() -> Self {
        RouterShape {
            hidden: DEFAULT_HIDDEN,
            windows: DEFAULT_WINDOWS,
        }
    }
}

/// Where a sidecar's routers came from. Free text; every field may be empty.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Provenance {
    /// Training data (name, split, size).
    pub dataset: String,
    /// Path-search settings, JSON text.
    pub search: String,
    /// Router training settings, JSON text.
    pub training: String,
    /// Evaluation results, JSON text.
    pub metrics: String,
    /// Creation time, RFC 3339 UTC date-time (see [`crate::rfc3339_utc_now`]).
    pub created: String,
    /// The tool and version that wrote the file.
    pub tool: String,
    /// Anything else.
    pub notes: String,
}

impl Provenance {
    fn fields(&self) -> [(&'static str, &String); 7] {
        [
            (keys::PROV_DATASET, &self.dataset),
            (keys::PROV_SEARCH, &self.search),
            (keys::PROV_TRAINING, &self.training),
            (keys::PROV_METRICS, &self.metrics),
            (keys::PROV_CREATED, &self.created),
            (keys::PROV_TOOL, &self.tool),
            (keys::PROV_NOTES, &self.notes),
        ]
    }
}

/// How router weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageType {
    /// Every tensor F32 (exact).
    F32,
    /// The two weight matrices as F16 (IEEE half, round to nearest even), the two biases as
    /// F32. Halves the file; values above 65504 in magnitude are refused.
    F16,
}

/// A router sidecar: the routers of every block of one base model, with their provenance.
#[derive(Clone, Debug, PartialEq)]
pub struct Sidecar {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// The model the routers belong to.
    pub base: BaseModel,
    /// Shape of every router.
    pub shape: RouterShape,
    /// Where the routers came from.
    pub provenance: Provenance,
    /// One router per block, in block order.
    pub routers: Vec<BlockRouter>,
}

/// Names of the four tensors of block `i`, in file order.
pub fn tensor_names(block: usize) -> [String; 4] {
    [
        format!("router.{block}.fc1.weight"),
        format!("router.{block}.fc1.bias"),
        format!("router.{block}.fc2.weight"),
        format!("router.{block}.fc2.bias"),
    ]
}

/// The `drllm-gguf` limits a sidecar is parsed with: far below the defaults, enough for
/// 1024 blocks and 1 MiB provenance strings.
pub fn sidecar_limits() -> Limits {
    Limits {
        max_kv: 256,
        max_tensors: 4 * MAX_BLOCKS + 16,
        max_string_len: MAX_STRING_BYTES,
        max_array_len: 4096,
        max_header_bytes: 32 << 20,
        max_alignment: 1 << 16,
        max_array_depth: 1,
        max_total_array_elems: 1 << 16,
    }
}

fn range(key: &str, value: u64, min: u64, max: u64) -> Result<(), FormatError> {
    if value < min || value > max {
        return Err(FormatError::OutOfRange {
            key: key.into(),
            value,
            min,
            max,
        });
    }
    Ok(())
}

fn check_finite(name: &str, v: &[f32]) -> Result<(), FormatError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(FormatError::NonFinite {
            name: name.into(),
            index,
        }),
        None => Ok(()),
    }
}

fn check_string(key: &str, s: &str) -> Result<(), FormatError> {
    if s.len() as u64 > MAX_STRING_BYTES {
        return Err(FormatError::InvalidValue {
            key: key.into(),
            reason: format!(
                "{} bytes, more than the {MAX_STRING_BYTES}-byte limit",
                s.len()
            ),
        });
    }
    Ok(())
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(name: &str, v: &[f32]) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::with_capacity(v.len() * 2);
    for (index, &x) in v.iter().enumerate() {
        let h = half::f16::from_f32(x);
        if !h.is_finite() {
            return Err(FormatError::NotRepresentable {
                name: name.into(),
                index,
                value: x,
            });
        }
        out.extend_from_slice(&h.to_le_bytes());
    }
    Ok(out)
}

/// Ranges and forms of the identity and shape fields (no allocation happens before these pass).
fn check_header(b: &BaseModel, shape: &RouterShape) -> Result<(), FormatError> {
    if b.architecture.is_empty() {
        return Err(FormatError::InvalidValue {
            key: keys::BASE_ARCHITECTURE.into(),
            reason: "empty".into(),
        });
    }
    check_string(keys::BASE_ARCHITECTURE, &b.architecture)?;
    range(
        keys::BASE_BLOCK_COUNT,
        u64::from(b.block_count),
        1,
        MAX_BLOCKS,
    )?;
    range(
        keys::BASE_EMBEDDING_LENGTH,
        u64::from(b.hidden_size),
        1,
        MAX_D,
    )?;
    if !is_sha256_string(&b.fingerprint) {
        return Err(FormatError::InvalidValue {
            key: keys::BASE_FINGERPRINT.into(),
            reason: format!(
                "'{}' is not 'sha256:' followed by 64 lowercase hex digits",
                b.fingerprint.chars().take(80).collect::<String>()
            ),
        });
    }
    range(
        keys::ROUTER_HIDDEN,
        shape.hidden as u64,
        1,
        MAX_ROUTER_HIDDEN,
    )?;
    range(keys::ROUTER_WINDOWS, shape.windows as u64, 1, MAX_WINDOWS)?;
    Ok(())
}

impl Sidecar {
    /// A sidecar for `base` whose routers are freshly initialised with
    /// [`BlockRouter::xavier`] (block `i` seeded with `seed + i`): the starting point of
    /// training. Checks the ranges of `base` and `shape` (and that the file would fit under
    /// [`MAX_FILE_BYTES`] as F16) before allocating anything.
    pub fn initial(
        base: BaseModel,
        shape: RouterShape,
        provenance: Provenance,
        seed: u64,
    ) -> Result<Self, FormatError> {
        check_header(&base, &shape)?;
        // smallest possible file: weights as f16, biases as f32 (all fit in u64 after the
        // range checks: at most 1024 * (4096 * 65536 + 4 * 4096 + 3) elements)
        let (l, d, h) = (
            u64::from(base.block_count),
            u64::from(base.hidden_size),
            shape.hidden as u64,
        );
        let min_bytes = l * (2 * (h * d + 3 * h) + 4 * (h + 3));
        if min_bytes > MAX_FILE_BYTES {
            return Err(FormatError::FileTooLarge {
                size: min_bytes,
                max: MAX_FILE_BYTES,
            });
        }
        let routers = (0..l)
            .map(|i| BlockRouter::xavier(d as usize, shape.hidden, seed.wrapping_add(i)))
            .collect();
        Ok(Sidecar {
            version: FORMAT_VERSION,
            base,
            shape,
            provenance,
            routers,
        })
    }

    /// The routers' input size `d` (the base model's hidden size).
    pub fn d(&self) -> usize {
        self.base.hidden_size as usize
    }

    /// Internal consistency: version, ranges, fingerprint form, one router per block, every
    /// vector of the declared length, every value finite, strings within limits.
    /// [`Sidecar::to_bytes`] and [`Sidecar::parse`] call it.
    pub fn validate(&self) -> Result<(), FormatError> {
        if self.version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: self.version,
                supported: FORMAT_VERSION,
            });
        }
        check_header(&self.base, &self.shape)?;
        for (key, s) in self.provenance.fields() {
            check_string(key, s)?;
        }
        if self.routers.len() != self.base.block_count as usize {
            return Err(FormatError::Inconsistent(format!(
                "{} routers for {} blocks",
                self.routers.len(),
                self.base.block_count
            )));
        }
        let (d, h) = (self.d(), self.shape.hidden);
        for (i, r) in self.routers.iter().enumerate() {
            let [n_w1, n_b1, n_w2, n_b2] = tensor_names(i);
            for (name, v, want) in [
                (&n_w1, &r.w1, h * d),
                (&n_b1, &r.b1, h),
                (&n_w2, &r.w2, 3 * h),
            ] {
                if v.len() != want {
                    return Err(FormatError::Inconsistent(format!(
                        "{name} has {} values, expected {want} (d {d}, hidden {h})",
                        v.len()
                    )));
                }
                check_finite(name, v)?;
            }
            check_finite(&n_b2, &r.b2)?;
        }
        Ok(())
    }

    /// Checks that the sidecar belongs to the model `base` (from [`crate::base_model_info`]):
    /// architecture, block count, hidden size, then the fingerprint
    /// ([`FormatError::WrongModel`] names both).
    pub fn check_base(&self, base: &BaseModel) -> Result<(), FormatError> {
        let s = &self.base;
        if s.architecture != base.architecture {
            return Err(FormatError::ArchitectureMismatch {
                sidecar: s.architecture.clone(),
                model: base.architecture.clone(),
            });
        }
        if s.block_count != base.block_count {
            return Err(FormatError::BlockCountMismatch {
                sidecar: s.block_count,
                model: base.block_count,
            });
        }
        if s.hidden_size != base.hidden_size {
            return Err(FormatError::HiddenSizeMismatch {
                sidecar: s.hidden_size,
                model: base.hidden_size,
            });
        }
        if s.fingerprint != base.fingerprint {
            return Err(FormatError::WrongModel {
                expected: s.fingerprint.clone(),
                found: base.fingerprint.clone(),
            });
        }
        Ok(())
    }

    /// The GGUF writer holding this sidecar (metadata and tensors in the canonical order).
    /// [`Sidecar::to_bytes`] writes it; exposed for tools and tests that edit files.
    pub fn to_writer(&self, storage: StorageType) -> Result<GgufWriter, FormatError> {
        self.validate()?;
        let mut w = GgufWriter::new();
        w.set(keys::ARCHITECTURE, Value::string(ARCHITECTURE));
        w.set(keys::FORMAT_VERSION, Value::U32(self.version));
        w.set(
            keys::BASE_ARCHITECTURE,
            Value::string(self.base.architecture.clone()),
        );
        w.set(keys::BASE_BLOCK_COUNT, Value::U32(self.base.block_count));
        w.set(
            keys::BASE_EMBEDDING_LENGTH,
            Value::U32(self.base.hidden_size),
        );
        w.set(
            keys::BASE_FINGERPRINT,
            Value::string(self.base.fingerprint.clone()),
        );
        // ranges were checked by validate, so these fit in u32
        w.set(keys::ROUTER_HIDDEN, Value::U32(self.shape.hidden as u32));
        w.set(keys::ROUTER_WINDOWS, Value::U32(self.shape.windows as u32));
        w.set(keys::ROUTER_ACTIVATION, Value::string(ACTIVATION));
        w.set(keys::ROUTER_CLASSES, Value::string_array(CLASSES));
        for (key, s) in self.provenance.fields() {
            w.set(key, Value::string(s.clone()));
        }
        let (d, h) = (self.d() as u64, self.shape.hidden as u64);
        for (i, r) in self.routers.iter().enumerate() {
            let [n_w1, n_b1, n_w2, n_b2] = tensor_names(i);
            let matrix = |name: &str, v: &[f32]| -> Result<(GgmlType, Vec<u8>), FormatError> {
                Ok(match storage {
                    StorageType::F32 => (GgmlType::F32, f32_bytes(v)),
                    StorageType::F16 => (GgmlType::F16, f16_bytes(name, v)?),
                })
            };
            let (t, b) = matrix(&n_w1, &r.w1)?;
            w.add_tensor(n_w1, t, &[d, h], TensorSource::Bytes(b))?;
            w.add_tensor(
                n_b1,
                GgmlType::F32,
                &[h],
                TensorSource::Bytes(f32_bytes(&r.b1)),
            )?;
            let (t, b) = matrix(&n_w2, &r.w2)?;
            w.add_tensor(n_w2, t, &[h, 3], TensorSource::Bytes(b))?;
            w.add_tensor(
                n_b2,
                GgmlType::F32,
                &[3],
                TensorSource::Bytes(f32_bytes(&r.b2)),
            )?;
        }
        Ok(w)
    }

    /// The complete file. Fails on an invalid sidecar, on F16 overflow, or if the file would
    /// exceed [`MAX_FILE_BYTES`] (readers would refuse it).
    pub fn to_bytes(&self, storage: StorageType) -> Result<Vec<u8>, FormatError> {
        let w = self.to_writer(storage)?;
        let mut out = Vec::new();
        w.write_to(&mut out)?;
        if out.len() as u64 > MAX_FILE_BYTES {
            return Err(FormatError::FileTooLarge {
                size: out.len() as u64,
                max: MAX_FILE_BYTES,
            });
        }
        Ok(out)
    }

    /// Writes the file atomically: to a temporary file in the same directory, synced, then
    /// renamed onto `path` (readers see the old file or the new one, never a partial one).
    pub fn write(&self, path: &Path, storage: StorageType) -> Result<(), FormatError> {
        let bytes = self.to_bytes(storage)?;
        write_atomic(path, &bytes)
    }

    /// Parses and validates a sidecar held in memory (see `SPEC.md`, "Validation").
    pub fn parse(bytes: &[u8]) -> Result<Sidecar, FormatError> {
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(FormatError::FileTooLarge {
                size: bytes.len() as u64,
                max: MAX_FILE_BYTES,
            });
        }
        let g = GgufFile::parse_with_limits(bytes, &sidecar_limits())?;
        parse_header_and_data(&g, bytes)
    }

    /// Reads and parses a sidecar file, refusing files over [`MAX_FILE_BYTES`] before
    /// reading them.
    pub fn read(path: &Path) -> Result<Sidecar, FormatError> {
        Sidecar::read_with_hash(path).map(|(s, _)| s)
    }

    /// [`Sidecar::read`] that also returns the [`content_hash`] of the bytes it parsed
    /// (the generation id for hot reload), reading the file once.
    pub fn read_with_hash(path: &Path) -> Result<(Sidecar, String), FormatError> {
        let bytes = read_capped(path)?;
        let s = Sidecar::parse(&bytes)?;
        Ok((s, content_hash(&bytes)))
    }
}

/// Reads a whole file, refusing one over [`MAX_FILE_BYTES`] without reading it.
pub fn read_capped(path: &Path) -> Result<Vec<u8>, FormatError> {
    let io = |source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    if size > MAX_FILE_BYTES {
        return Err(FormatError::FileTooLarge {
            size,
            max: MAX_FILE_BYTES,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // the file may grow after the size check: never read past the cap
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(FormatError::FileTooLarge {
            size: bytes.len() as u64,
            max: MAX_FILE_BYTES,
        });
    }
    Ok(bytes)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FormatError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| FormatError::Io { path: p, source }
    };
    let name = path.file_name().ok_or_else(|| FormatError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Content hash of a sidecar file's bytes (`"sha256:"` + 64 hex digits), used as the
/// hot-reload generation id.
pub fn content_hash(bytes: &[u8]) -> String {
    sha256_string(bytes)
}

/// The conventional sidecar path for a model: `dir/NAME.routers.gguf` for `dir/NAME.gguf`
/// (the extension compared case-insensitively), and `.routers.gguf` appended to the file
/// name for any other extension (`m.bin` -> `m.bin.routers.gguf`).
pub fn sidecar_path_for(model: &Path) -> PathBuf {
    let is_gguf = model
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf && model.file_stem().is_some() {
        return model.with_extension("routers.gguf");
    }
    let mut s = model.as_os_str().to_os_string();
    s.push(".routers.gguf");
    PathBuf::from(s)
}

// ---------------------------------------------------------------------------------------
// reading

fn get<'a>(g: &'a GgufFile, key: &str) -> Result<&'a Value, FormatError> {
    g.get(key)
        .ok_or_else(|| FormatError::MissingKey { key: key.into() })
}

fn get_u32(g: &GgufFile, key: &str) -> Result<u32, FormatError> {
    match get(g, key)? {
        Value::U32(v) => Ok(*v),
        v => Err(FormatError::WrongType {
            key: key.into(),
            expected: "u32",
            found: type_name(v),
        }),
    }
}

fn str_value<'a>(key: &str, v: &'a Value) -> Result<&'a str, FormatError> {
    match v {
        Value::String(s) => Ok(s),
        v => Err(FormatError::WrongType {
            key: key.into(),
            expected: "str",
            found: type_name(v),
        }),
    }
}

fn get_str<'a>(g: &'a GgufFile, key: &str) -> Result<&'a str, FormatError> {
    str_value(key, get(g, key)?)
}

fn opt_str(g: &GgufFile, key: &str) -> Result<String, FormatError> {
    match g.get(key) {
        None => Ok(String::new()),
        Some(v) => str_value(key, v).map(str::to_owned),
    }
}

#[derive(Clone, Copy)]
enum Part {
    W1,
    B1,
    W2,
    B2,
}

fn decode(g: &GgufFile, bytes: &[u8], t: &TensorInfo) -> Result<Vec<f32>, FormatError> {
    let data = g.tensor_bytes(bytes, t)?;
    let v: Vec<f32> = if t.dtype == GgmlType::F32 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    check_finite(&t.name, &v)?;
    Ok(v)
}

fn parse_header_and_data(g: &GgufFile, bytes: &[u8]) -> Result<Sidecar, FormatError> {
    // identity and version first: a model file or a newer sidecar gets a precise message
    let version = check_identity(g)?;
    let base_arch = get_str(g, keys::BASE_ARCHITECTURE)?;
    let block_count = get_u32(g, keys::BASE_BLOCK_COUNT)?;
    range(
        keys::BASE_BLOCK_COUNT,
        u64::from(block_count),
        1,
        MAX_BLOCKS,
    )?;
    let d32 = get_u32(g, keys::BASE_EMBEDDING_LENGTH)?;
    range(keys::BASE_EMBEDDING_LENGTH, u64::from(d32), 1, MAX_D)?;
    let fingerprint = get_str(g, keys::BASE_FINGERPRINT)?;
    let hidden32 = get_u32(g, keys::ROUTER_HIDDEN)?;
    range(
        keys::ROUTER_HIDDEN,
        u64::from(hidden32),
        1,
        MAX_ROUTER_HIDDEN,
    )?;
    let windows32 = get_u32(g, keys::ROUTER_WINDOWS)?;
    range(keys::ROUTER_WINDOWS, u64::from(windows32), 1, MAX_WINDOWS)?;
    check_router_kind(g)?;
    let provenance = Provenance {
        dataset: opt_str(g, keys::PROV_DATASET)?,
        search: opt_str(g, keys::PROV_SEARCH)?,
        training: opt_str(g, keys::PROV_TRAINING)?,
        metrics: opt_str(g, keys::PROV_METRICS)?,
        created: opt_str(g, keys::PROV_CREATED)?,
        tool: opt_str(g, keys::PROV_TOOL)?,
        notes: opt_str(g, keys::PROV_NOTES)?,
    };
    let routers = read_routers(
        g,
        bytes,
        block_count as usize,
        d32 as u64,
        u64::from(hidden32),
    )?;
    let sidecar = Sidecar {
        version,
        base: BaseModel {
            architecture: base_arch.to_owned(),
            block_count,
            hidden_size: d32,
            fingerprint: fingerprint.to_owned(),
        },
        shape: RouterShape {
            hidden: hidden32 as usize,
            windows: windows32 as usize,
        },
        provenance,
        routers,
    };
    sidecar.validate()?;
    Ok(sidecar)
}

/// A sidecar of a version this build reads; gives the version.
fn check_identity(g: &GgufFile) -> Result<u32, FormatError> {
    let arch = get_str(g, keys::ARCHITECTURE)?;
    if arch != ARCHITECTURE {
        return Err(FormatError::WrongArchitecture {
            found: arch.chars().take(200).collect(),
        });
    }
    let version = get_u32(g, keys::FORMAT_VERSION)?;
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(version)
}

/// The routers' activation and classes are the ones this build computes.
fn check_router_kind(g: &GgufFile) -> Result<(), FormatError> {
    let activation = get_str(g, keys::ROUTER_ACTIVATION)?;
    if activation != ACTIVATION {
        return Err(FormatError::UnsupportedActivation {
            found: activation.chars().take(200).collect(),
        });
    }
    let classes = match get(g, keys::ROUTER_CLASSES)? {
        Value::Array(a) if a.elem_type == drllm_gguf::ValueType::String => a
            .values
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>(),
        v => {
            return Err(FormatError::WrongType {
                key: keys::ROUTER_CLASSES.into(),
                expected: "arr[str]",
                found: type_name(v),
            })
        }
    };
    if classes.len() != CLASSES.len() || classes.iter().zip(CLASSES).any(|(a, b)| a != b) {
        return Err(FormatError::BadClasses { found: classes });
    }
    Ok(())
}

/// The tensors: exactly the expected set, right shapes, f32/f16, finite.
fn read_routers(
    g: &GgufFile,
    bytes: &[u8],
    blocks: usize,
    d: u64,
    h: u64,
) -> Result<Vec<BlockRouter>, FormatError> {
    let mut expected: HashMap<String, (usize, Part)> = HashMap::with_capacity(4 * blocks);
    for i in 0..blocks {
        let [a, b, c, e] = tensor_names(i);
        expected.insert(a, (i, Part::W1));
        expected.insert(b, (i, Part::B1));
        expected.insert(c, (i, Part::W2));
        expected.insert(e, (i, Part::B2));
    }
    for t in &g.tensors {
        if !expected.contains_key(&t.name) {
            return Err(FormatError::UnexpectedTensor {
                name: t.name.clone(),
            });
        }
    }
    let by_name: HashMap<&str, &TensorInfo> =
        g.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut routers = Vec::with_capacity(blocks);
    for i in 0..blocks {
        let names = tensor_names(i);
        let mut parts: [Vec<f32>; 4] = Default::default();
        for (k, (name, part)) in names
            .iter()
            .zip([Part::W1, Part::B1, Part::W2, Part::B2])
            .enumerate()
        {
            let t = by_name
                .get(name.as_str())
                .ok_or_else(|| FormatError::MissingTensor { name: name.clone() })?;
            if t.dtype != GgmlType::F32 && t.dtype != GgmlType::F16 {
                return Err(FormatError::UnsupportedDtype {
                    name: name.clone(),
                    dtype: t.dtype,
                });
            }
            let want: Vec<u64> = match part {
                Part::W1 => vec![d, h],
                Part::B1 => vec![h],
                Part::W2 => vec![h, 3],
                Part::B2 => vec![3],
            };
            if t.dims != want {
                return Err(FormatError::WrongShape {
                    name: name.clone(),
                    expected: want,
                    found: t.dims.clone(),
                });
            }
            if let Some(slot) = parts.get_mut(k) {
                *slot = decode(g, bytes, t)?;
            }
        }
        let [w1, b1, w2, b2] = parts;
        let b2: [f32; 3] = b2.try_into().map_err(|v: Vec<f32>| {
            FormatError::Inconsistent(format!("router.{i}.fc2.bias has {} values", v.len()))
        })?;
        routers.push(BlockRouter { w1, b1, w2, b2 });
    }
    Ok(routers)
}
