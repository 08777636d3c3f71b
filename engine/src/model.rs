//! Loading a GGUF model into ggml backend buffers, the way llama.cpp does it.
//!
//! The file is first checked by drllm's own hardened GGUF reader (`drllm-gguf`), then opened with
//! ggml's gguf reader for tensor metadata; each weight goes to the first buffer type in llama.cpp's
//! preference list whose device supports the op that weight is used in (so on CPU, quantized
//! matrices land in the repacked "extra" buffer types and run llama.cpp's fastest kernels).
//!
//! [`Model::load`] runs llama.cpp's loading steps, one function each: `open_checked` (drllm's
//! reader, then `ModelConfig::from_gguf`), `ggml_metadata`, `Devices::pick`, `wanted_tensors`
//! (with `block_tensors`), `refuse_leftovers`, `choose_bufts` (with `check_tensor` and
//! `select_buft`), `tied_output`, `group_by_buft`, `map_file`, `place_weights` (with
//! `map_in_place`), `upload`, and `Table::weights` (the weight table).

use crate::arch::{Ffn, QkNorm};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::ffi::{self, Buffer, GgmlCtx, Tensor};
use drllm_gguf::GgufFile;
use llama_cpp_sys_2 as sys;
use llama_cpp_sys_2::{
    GGML_OP_ADD as ADD, GGML_OP_GET_ROWS as ROWS, GGML_OP_MUL as MUL, GGML_OP_MUL_MAT as MM,
    GGML_OP_MUL_MAT_ID as MM_ID,
};
use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Which device runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The best ggml device available (a GPU when drllm is built with CUDA or Metal).
    #[default]
    Auto,
    /// Force the CPU.
    Cpu,
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            other => Err(format!("unknown device '{other}' (auto or cpu)")),
        }
    }
}

/// Weights of one transformer block.
pub(crate) struct BlockWeights {
    pub attn_norm: Option<Tensor>,
    /// Q, K and V: one fused matrix (and bias), or three.
    pub wqkv: Option<Tensor>,
    pub bqkv: Option<Tensor>,
    pub wq: Option<Tensor>,
    pub wk: Option<Tensor>,
    pub wv: Option<Tensor>,
    pub wo: Tensor,
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub bo: Option<Tensor>,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub attn_post_norm: Option<Tensor>,
    pub ffn_norm: Option<Tensor>,
    pub ffn: FfnWeights,
    pub ffn_post_norm: Option<Tensor>,
}

/// The feed-forward part of a block.
pub(crate) enum FfnWeights {
    Dense {
        /// None when `up` holds gate and up together (phi3).
        gate: Option<Tensor>,
        up: Tensor,
        down: Tensor,
        gate_b: Option<Tensor>,
        up_b: Option<Tensor>,
        down_b: Option<Tensor>,
    },
    /// A mixture of experts: the router `gate_inp` `[n_embd, n_expert]` and the experts'
    /// matrices stacked along the third dimension.
    Experts {
        gate_inp: Tensor,
        gate: Tensor,
        up: Tensor,
        down: Tensor,
    },
}

/// Alignment of tensor data that can be used in place from the file mapping (ggml's
/// `TENSOR_ALIGNMENT`); data aligned less is copied.
const MAP_ALIGNMENT: u64 = 32;

/// A loaded model: configuration and weights in backend buffers. Immutable once loaded and
/// shared between sessions (`Arc<Model>`).
pub struct Model {
    pub(crate) cfg: ModelConfig,
    path: PathBuf,
    gguf: GgufFile,
    pub(crate) tok_embd: Tensor,
    pub(crate) output_norm: Tensor,
    pub(crate) output: Tensor,
    pub(crate) rope_freqs: Option<Tensor>,
    pub(crate) blocks: Vec<BlockWeights>,
    /// The accelerator the layers live on, if any.
    pub(crate) gpu: Option<sys::ggml_backend_dev_t>,
    pub(crate) cpu: sys::ggml_backend_dev_t,
    buffers: Vec<Buffer>,
    _ctxs: Vec<GgmlCtx>,
    /// The file, mapped; weights in the plain CPU buffer type point into it.
    _mmap: memmap2::Mmap,
}

// SAFETY: after loading, the weights are never written; tensors and buffers are plain memory
// owned by the Model. Sessions only read them.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Layer {
    Input,
    Output,
    Repeating,
}

struct Wanted {
    name: String,
    shape: Vec<i64>,
    op: sys::ggml_op,
    layer: Layer,
    required: bool,
}

type BuftList = Vec<(sys::ggml_backend_dev_t, sys::ggml_backend_buffer_type_t)>;

impl Model {
    /// Loads a model file, in llama.cpp's steps: the file checked and its configuration read,
    /// ggml's tensor metadata, the devices and their buffer types, the tensors the family
    /// needs (and no other), a buffer type for each, the tied LM head, the file mapped, the
    /// weights placed and uploaded, the table of each block's weights.
    pub fn load(path: impl AsRef<Path>, device: DeviceChoice) -> Result<Model> {
        let path = path.as_ref().to_path_buf();
        crate::init_backend();
        let gguf = open_checked(&path)?;
        let mut cfg = ModelConfig::from_gguf(&gguf)?;
        let meta = ggml_metadata(&path)?;
        let devs = Devices::pick(device)?;
        let wanted = wanted_tensors(&mut cfg, &meta)?;
        refuse_leftovers(&gguf, &wanted, cfg.arch.name)?;
        let chosen = choose_bufts(&wanted, &meta, &gguf, &devs, &cfg)?;
        let tied = meta_tensor(&meta, "output.weight").is_none();
        let output_dup = if tied {
            Some(tied_output(&meta, &devs, &cfg)?)
        } else {
            None
        };
        let (by_buft, share_output_with_embd) = group_by_buft(&wanted, &chosen, output_dup);
        let mmap = map_file(&path, &gguf)?;
        // SAFETY: registry query.
        let cpu_plain = unsafe { sys::ggml_backend_dev_buffer_type(devs.cpu) };
        let placed = place_weights(&by_buft, tied, cpu_plain, &gguf, &mmap)?;
        drop(meta);
        upload(&placed.uploads, &gguf, &mmap)?;
        let w = Table(&placed.tensors).weights(&cfg, share_output_with_embd)?;
        Ok(Model {
            output_norm: w.output_norm,
            rope_freqs: w.rope_freqs,
            tok_embd: w.tok_embd,
            output: w.output,
            blocks: w.blocks,
            gpu: devs.gpu,
            cpu: devs.cpu,
            cfg,
            path,
            gguf,
            buffers: placed.buffers,
            _ctxs: placed.ctxs,
            _mmap: mmap,
        })
    }

    /// Hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Number of transformer blocks.
    pub fn n_layer(&self) -> usize {
        self.cfg.n_layer
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        self.cfg.n_vocab
    }

    /// The file the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed GGUF header (metadata and tensor table).
    pub fn gguf(&self) -> &GgufFile {
        &self.gguf
    }

    /// Name of the device that runs the blocks.
    pub fn device_name(&self) -> String {
        match self.gpu {
            Some(g) => format!("{} ({})", ffi::dev_name(g), ffi::dev_description(g)),
            None => "CPU".into(),
        }
    }

    /// Weight bytes per buffer type, e.g. `[("CPU_REPACK", 60_000_000), ("CPU", 40_000_000)]`.
    pub fn buffer_summary(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for b in &self.buffers {
            // SAFETY: live buffer.
            let name = ffi::buft_name(unsafe { sys::ggml_backend_buffer_get_type(b.ptr()) });
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some(e) => e.1 += b.size(),
                None => out.push((name, b.size())),
            }
        }
        out
    }
}

fn trim_ne(ne: &[i64; 4]) -> Vec<i64> {
    let mut v = ne.to_vec();
    while v.len() > 1 && v[v.len() - 1] == 1 {
        v.pop();
    }
    v
}

/// The file, checked by drllm's own hardened GGUF reader before ggml sees it.
fn open_checked(path: &Path) -> Result<GgufFile> {
    GgufFile::open(path).map_err(|e| match e {
        drllm_gguf::GgufError::Io(source) => EngineError::Io {
            path: path.to_path_buf(),
            source,
        },
        source => EngineError::Gguf {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// ggml's own gguf reader for the tensor metadata: a no-alloc context of the file's tensors.
fn ggml_metadata(path: &Path) -> Result<GgmlCtx> {
    let cpath = CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| EngineError::State("path contains a NUL byte".into()))?;
    let mut meta_raw: *mut sys::ggml_context = std::ptr::null_mut();
    let params = sys::gguf_init_params {
        no_alloc: true,
        ctx: &mut meta_raw,
    };
    // SAFETY: valid C path; on success meta_raw receives a context we own.
    let gctx = unsafe { sys::gguf_init_from_file(cpath.as_ptr(), params) };
    if gctx.is_null() {
        return Err(EngineError::Ggml(format!(
            "ggml's gguf reader rejected {}",
            path.display()
        )));
    }
    // SAFETY: gctx is live; we only need the ggml context it made.
    unsafe { sys::gguf_free(gctx) };
    GgmlCtx::from_raw(meta_raw)
        .ok_or_else(|| EngineError::Ggml("gguf reader returned no tensor context".into()))
}

/// The devices and their buffer type lists (llama.cpp: make_cpu_buft_list /
/// make_gpu_buft_list).
struct Devices {
    cpu: sys::ggml_backend_dev_t,
    /// The accelerator the layers live on, if any.
    gpu: Option<sys::ggml_backend_dev_t>,
    /// Buffer types for the input layer (the token embeddings).
    cpu_list: BuftList,
    /// Buffer types for the repeating layers and the output layer.
    layer_list: BuftList,
}

impl Devices {
    fn pick(device: DeviceChoice) -> Result<Devices> {
        let cpu = ffi::cpu_device()?;
        let gpu = match device {
            DeviceChoice::Cpu => None,
            DeviceChoice::Auto => {
                let devs = ffi::devices();
                devs.iter()
                    .find(|(_, t)| *t == sys::GGML_BACKEND_DEVICE_TYPE_GPU)
                    .or_else(|| {
                        devs.iter()
                            .find(|(_, t)| *t == sys::GGML_BACKEND_DEVICE_TYPE_IGPU)
                    })
                    .map(|(d, _)| *d)
            }
        };
        let mut cpu_list: BuftList = Vec::new();
        // SAFETY: registry queries.
        unsafe {
            for (d, t) in ffi::devices() {
                if t == sys::GGML_BACKEND_DEVICE_TYPE_ACCEL {
                    let b = sys::ggml_backend_dev_buffer_type(d);
                    if b != sys::ggml_backend_cpu_buffer_type() {
                        cpu_list.push((d, b));
                    }
                }
            }
            if let Some(g) = gpu {
                let hb = sys::ggml_backend_dev_host_buffer_type(g);
                if !hb.is_null() {
                    cpu_list.push((g, hb));
                }
            }
            for b in ffi::cpu_extra_bufts(cpu) {
                cpu_list.push((cpu, b));
            }
            cpu_list.push((cpu, sys::ggml_backend_dev_buffer_type(cpu)));
        }
        let layer_list: BuftList = match gpu {
            // SAFETY: registry query.
            Some(g) => {
                let mut l = vec![(g, unsafe { sys::ggml_backend_dev_buffer_type(g) })];
                l.extend(cpu_list.iter().copied());
                l
            }
            None => cpu_list.clone(),
        };
        Ok(Devices {
            cpu,
            gpu,
            cpu_list,
            layer_list,
        })
    }
}

/// The list of tensors a family needs, in the order they are placed.
struct Wants(Vec<Wanted>);

impl Wants {
    fn want(
        &mut self,
        name: String,
        shape: Vec<i64>,
        op: sys::ggml_op,
        layer: Layer,
        required: bool,
    ) {
        self.0.push(Wanted {
            name,
            shape,
            op,
            layer,
            required,
        })
    }
}

/// The tensors the family needs: embeddings, output norm and head, RoPE factors, then each
/// block's. Sets the vocabulary size to the embedding's rows (checked against the tokenizer's).
fn wanted_tensors(cfg: &mut ModelConfig, meta: &GgmlCtx) -> Result<Vec<Wanted>> {
    let e = cfg.n_embd as i64;
    let mut wanted = Wants(Vec::new());
    // the vocabulary size is whatever the embedding has; checked below
    let n_vocab = meta_tensor(meta, "token_embd.weight")
        // SAFETY: a live meta tensor.
        .map(|t| unsafe { (*t).ne[1] })
        .ok_or_else(|| EngineError::MissingTensor {
            name: "token_embd.weight".into(),
        })?;
    if cfg.n_vocab != 0 && cfg.n_vocab as i64 != n_vocab {
        return Err(EngineError::BadTensor {
            name: "token_embd.weight".into(),
            reason: format!(
                "{n_vocab} rows but the vocabulary has {} tokens",
                cfg.n_vocab
            ),
        });
    }
    cfg.n_vocab = n_vocab as usize;
    let (input, output) = (Layer::Input, Layer::Output);
    wanted.want(
        "token_embd.weight".into(),
        vec![e, n_vocab],
        ROWS,
        input,
        true,
    );
    wanted.want("output_norm.weight".into(), vec![e], MUL, output, true);
    wanted.want("output.weight".into(), vec![e, n_vocab], MM, output, false);
    if cfg.arch.rope_freqs {
        wanted.want(
            "rope_freqs.weight".into(),
            vec![(cfg.rope.n_rot / 2) as i64],
            sys::GGML_OP_ROPE,
            Layer::Repeating,
            false,
        );
    }
    for i in 0..cfg.n_layer {
        block_tensors(&mut wanted, i, cfg, meta);
    }
    Ok(wanted.0)
}

/// The tensors of block `i`: norms, attention, then the FFN (dense or experts).
fn block_tensors(wanted: &mut Wants, i: usize, cfg: &ModelConfig, meta: &GgmlCtx) {
    let (e, hd, nh, nkv, ff) = (
        cfg.n_embd as i64,
        cfg.head_dim_k as i64,
        cfg.n_head as i64,
        cfg.n_head_kv as i64,
        cfg.n_ff as i64,
    );
    let arch = cfg.arch;
    let qkv_bias = arch.qkv_bias;
    let n = |s: &str| format!("blk.{i}.{s}");
    let r = Layer::Repeating;
    let mut want = |name, shape, op, required| wanted.want(name, shape, op, r, required);
    if arch.pre_norms {
        want(n("attn_norm.weight"), vec![e], MUL, true);
    }
    // Q, K and V in one matrix when the file has it (llama.cpp's create_tensor_qkv
    // accepts that layout for every family), else three
    if meta_tensor(meta, &n("attn_qkv.weight")).is_some() {
        let qkv = (nh + 2 * nkv) * hd;
        want(n("attn_qkv.weight"), vec![e, qkv], MM, true);
        want(n("attn_qkv.bias"), vec![qkv], ADD, qkv_bias);
    } else {
        want(n("attn_q.weight"), vec![e, nh * hd], MM, true);
        want(n("attn_k.weight"), vec![e, nkv * hd], MM, true);
        want(n("attn_v.weight"), vec![e, nkv * hd], MM, true);
        want(n("attn_q.bias"), vec![nh * hd], ADD, qkv_bias);
        want(n("attn_k.bias"), vec![nkv * hd], ADD, qkv_bias);
        want(n("attn_v.bias"), vec![nkv * hd], ADD, qkv_bias);
    }
    want(n("attn_output.weight"), vec![nh * hd, e], MM, true);
    want(n("attn_output.bias"), vec![e], ADD, false);
    match arch.qk_norm {
        QkNorm::None => {}
        QkNorm::PerHead => {
            want(n("attn_q_norm.weight"), vec![hd], MUL, true);
            want(n("attn_k_norm.weight"), vec![hd], MUL, true);
        }
        QkNorm::Full => {
            want(n("attn_q_norm.weight"), vec![nh * hd], MUL, true);
            want(n("attn_k_norm.weight"), vec![nkv * hd], MUL, true);
        }
    }
    if arch.post_norms {
        want(n("post_attention_norm.weight"), vec![e], MUL, true);
        want(n("post_ffw_norm.weight"), vec![e], MUL, true);
    }
    if arch.pre_norms {
        want(n("ffn_norm.weight"), vec![e], MUL, true);
    }
    if let Some(moe) = cfg.moe {
        let (x, xf) = (moe.n_expert as i64, moe.n_ff_exp as i64);
        want(n("ffn_gate_inp.weight"), vec![e, x], MM, true);
        want(n("ffn_gate_exps.weight"), vec![e, xf, x], MM_ID, true);
        want(n("ffn_up_exps.weight"), vec![e, xf, x], MM_ID, true);
        want(n("ffn_down_exps.weight"), vec![xf, e, x], MM_ID, true);
        return;
    }
    if arch.ffn == Ffn::SwiGluFused {
        // gate and up in one matrix (phi3)
        want(n("ffn_up.weight"), vec![e, 2 * ff], MM, true);
    } else {
        want(n("ffn_gate.weight"), vec![e, ff], MM, true);
        want(n("ffn_up.weight"), vec![e, ff], MM, true);
    }
    want(n("ffn_down.weight"), vec![ff, e], MM, true);
    if arch.ffn_bias {
        want(n("ffn_gate.bias"), vec![ff], ADD, false);
        want(n("ffn_up.bias"), vec![ff], ADD, false);
        want(n("ffn_down.bias"), vec![e], ADD, false);
    }
}

/// Every tensor of the file is used (llama.cpp refuses a tensor-count mismatch): a file
/// carrying tensors this graph would ignore (biases, scales, another family's extras) would
/// give other logits than llama.cpp, so it is refused, naming them.
fn refuse_leftovers(gguf: &GgufFile, wanted: &[Wanted], arch: &str) -> Result<()> {
    let leftovers: Vec<String> = gguf
        .tensors
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| !wanted.iter().any(|w| &w.name == n))
        .collect();
    if !leftovers.is_empty() {
        return Err(EngineError::UnusedTensors {
            arch: arch.to_string(),
            names: leftovers,
        });
    }
    Ok(())
}

/// A wanted tensor present in the file: (index in the wanted list, meta tensor, buffer type).
type Chosen = (usize, Tensor, sys::ggml_backend_buffer_type_t);

/// Checks each wanted tensor's presence and shape, and picks a buffer type for it.
fn choose_bufts(
    wanted: &[Wanted],
    meta: &GgmlCtx,
    gguf: &GgufFile,
    devs: &Devices,
    cfg: &ModelConfig,
) -> Result<Vec<Chosen>> {
    let mut chosen: Vec<Chosen> = Vec::new();
    for (wi, w) in wanted.iter().enumerate() {
        let Some(t) = meta_tensor(meta, &w.name) else {
            if w.required {
                return Err(EngineError::MissingTensor {
                    name: w.name.clone(),
                });
            }
            continue;
        };
        check_tensor(w, t, gguf)?;
        let list = match w.layer {
            Layer::Input => &devs.cpu_list,
            _ => &devs.layer_list,
        };
        let buft = select_buft(t, w.op, list, cfg)?.ok_or_else(|| {
            EngineError::Ggml(format!("no buffer type can hold tensor {}", w.name))
        })?;
        chosen.push((wi, t, buft));
    }
    Ok(chosen)
}

/// The meta tensor `t` has the shape the family wants, and ggml and drllm agree on its size.
fn check_tensor(w: &Wanted, t: Tensor, gguf: &GgufFile) -> Result<()> {
    // SAFETY: t is a live meta tensor.
    let ne = unsafe { (*t).ne };
    let mut want_ne = [1i64; 4];
    want_ne[..w.shape.len()].copy_from_slice(&w.shape);
    if ne != want_ne {
        return Err(EngineError::BadTensor {
            name: w.name.clone(),
            reason: format!("shape {:?}, expected {:?}", trim_ne(&ne), trim_ne(&want_ne)),
        });
    }
    let info = gguf
        .tensor(&w.name)
        .ok_or_else(|| EngineError::MissingTensor {
            name: w.name.clone(),
        })?;
    // SAFETY: t is live.
    if unsafe { sys::ggml_nbytes(t) } as u64 != info.size {
        return Err(EngineError::BadTensor {
            name: w.name.clone(),
            reason: "ggml and drllm disagree on the tensor size".into(),
        });
    }
    Ok(())
}

/// Tied output: llama.cpp duplicates token_embd for the LM head in the output buffer list.
fn tied_output(
    meta: &GgmlCtx,
    devs: &Devices,
    cfg: &ModelConfig,
) -> Result<(Tensor, sys::ggml_backend_buffer_type_t)> {
    let t = meta_tensor(meta, "token_embd.weight").ok_or_else(|| EngineError::MissingTensor {
        name: "token_embd.weight".into(),
    })?;
    let buft = select_buft(t, MM, &devs.layer_list, cfg)?
        .ok_or_else(|| EngineError::Ggml("no buffer type can hold the LM head".into()))?;
    Ok((t, buft))
}

/// Named meta tensors grouped by the buffer type they go to, in order of first use.
type ByBuft = Vec<(sys::ggml_backend_buffer_type_t, Vec<(String, Tensor)>)>;

/// One context + buffer per buffer type: the chosen tensors grouped, and the tied LM head
/// added unless it lands where the embeddings do (then it is the embeddings: the returned
/// flag).
fn group_by_buft(
    wanted: &[Wanted],
    chosen: &[Chosen],
    output_dup: Option<(Tensor, sys::ggml_backend_buffer_type_t)>,
) -> (ByBuft, bool) {
    let mut by_buft: ByBuft = Vec::new();
    let mut push = |buft, name: String, t| {
        if let Some(e) = by_buft.iter_mut().find(|(b, _)| *b == buft) {
            e.1.push((name, t));
        } else {
            by_buft.push((buft, vec![(name, t)]));
        }
    };
    let embd_buft = chosen
        .iter()
        .find(|(wi, _, _)| wanted[*wi].name == "token_embd.weight")
        .map(|(_, _, b)| *b);
    for (wi, t, buft) in chosen {
        push(*buft, wanted[*wi].name.clone(), *t);
    }
    let mut share_output_with_embd = false;
    if let Some((t, buft)) = output_dup {
        if Some(buft) == embd_buft {
            share_output_with_embd = true;
        } else {
            push(buft, "output.weight".into(), t);
        }
    }
    (by_buft, share_output_with_embd)
}

/// Weights in the plain CPU buffer type are used in place from a read-only mapping of the
/// file (llama.cpp's "CPU_Mapped" buffer): no copy, shared page cache. The others (repacked
/// CPU layouts, accelerator memory) get their own buffers and are uploaded.
fn map_file(path: &Path, gguf: &GgufFile) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the mapping is read-only and kept alive by the Model; drllm never writes
    // through it. (As with llama.cpp, truncating the file while it is mapped is not
    // supported.)
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if mmap.len() as u64 != gguf.file_size {
        return Err(EngineError::State(format!(
            "{} changed size while loading",
            path.display()
        )));
    }
    Ok(mmap)
}

/// The weights in their buffers.
struct Placed {
    ctxs: Vec<GgmlCtx>,
    buffers: Vec<Buffer>,
    tensors: HashMap<String, Tensor>,
    /// (tensor in its buffer, name of the file tensor holding its bytes), still to upload.
    uploads: Vec<(Tensor, String)>,
}

/// Makes each buffer type's tensors in a context of their own and gives them a buffer: a view
/// of the mapped file for plain CPU tensors aligned as ggml wants, else an allocated buffer
/// whose tensors are uploaded later.
fn place_weights(
    by_buft: &ByBuft,
    tied: bool,
    cpu_plain: sys::ggml_backend_buffer_type_t,
    gguf: &GgufFile,
    mmap: &memmap2::Mmap,
) -> Result<Placed> {
    let mut placed = Placed {
        ctxs: Vec::new(),
        buffers: Vec::new(),
        tensors: HashMap::new(),
        uploads: Vec::new(),
    };
    let src_name = |name: &str| -> String {
        if tied && name == "output.weight" {
            "token_embd.weight".to_string()
        } else {
            name.to_string()
        }
    };
    for (buft, list) in by_buft {
        let ctx = GgmlCtx::new(list.len() + 1, 0)?;
        let mut made = Vec::new();
        for (name, meta_t) in list {
            // SAFETY: duplicate the meta tensor's type/shape into our context.
            let t = unsafe { sys::ggml_dup_tensor(ctx.ptr(), *meta_t) };
            ffi::set_name(t, name);
            placed.tensors.insert(name.clone(), t);
            made.push((t, src_name(name)));
        }
        // ggml's CPU kernels and buffers want 32-byte aligned data: a file with a smaller
        // general.alignment has its tensors copied into an allocated buffer instead
        let aligned = made.iter().all(|(_, src)| {
            gguf.tensor(src).is_some_and(|i| {
                gguf.tensor_data_range(i)
                    .start
                    .is_multiple_of(MAP_ALIGNMENT)
            })
        });
        let buf = if *buft == cpu_plain && aligned {
            map_in_place(&made, gguf, mmap)?
        } else {
            let buf = Buffer::alloc_ctx_tensors(&ctx, *buft)?;
            set_weights_usage(&buf);
            placed.uploads.extend(made);
            buf
        };
        placed.buffers.push(buf);
        placed.ctxs.push(ctx);
    }
    Ok(placed)
}

fn set_weights_usage(buf: &Buffer) {
    // SAFETY: live buffer.
    unsafe {
        sys::ggml_backend_buffer_set_usage(buf.ptr(), sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
    };
}

/// One buffer over the file's span of these tensors' data, each tensor pointing at its bytes.
fn map_in_place(
    made: &[(Tensor, String)],
    gguf: &GgufFile,
    mmap: &memmap2::Mmap,
) -> Result<Buffer> {
    let mut lo = u64::MAX;
    let mut hi = 0u64;
    for (_, src) in made {
        let info = gguf
            .tensor(src)
            .ok_or_else(|| EngineError::MissingTensor { name: src.clone() })?;
        let r = gguf.tensor_data_range(info);
        lo = lo.min(r.start);
        hi = hi.max(r.end);
    }
    if lo >= hi || hi > mmap.len() as u64 {
        return Err(EngineError::State("tensor data outside the file".into()));
    }
    let base = mmap.as_ptr() as *mut u8;
    // SAFETY: [lo, hi) lies inside the mapping (checked above, and every range
    // was validated against the file size by drllm-gguf).
    let buf = unsafe {
        sys::ggml_backend_cpu_buffer_from_ptr(base.add(lo as usize).cast(), (hi - lo) as usize)
    };
    let buf = Buffer::from_raw(buf)
        .ok_or_else(|| EngineError::Ggml("could not map the weights".into()))?;
    for (t, src) in made {
        let info = gguf
            .tensor(src)
            .ok_or_else(|| EngineError::MissingTensor { name: src.clone() })?;
        let start = gguf.tensor_data_range(info).start;
        // SAFETY: the tensor's bytes lie inside the buffer; ggml only reads them.
        let st = unsafe {
            sys::ggml_backend_tensor_alloc(buf.ptr(), *t, base.add(start as usize).cast())
        };
        if st != sys::GGML_STATUS_SUCCESS {
            return Err(EngineError::Ggml(format!("could not map tensor {src}")));
        }
    }
    set_weights_usage(&buf);
    Ok(buf)
}

/// Uploads the tensors of allocated buffers from the mapping (repacking happens inside
/// ggml_backend_tensor_set).
fn upload(uploads: &[(Tensor, String)], gguf: &GgufFile, mmap: &memmap2::Mmap) -> Result<()> {
    for (t, src) in uploads {
        let info = gguf
            .tensor(src)
            .ok_or_else(|| EngineError::MissingTensor { name: src.clone() })?;
        let r = gguf.tensor_data_range(info);
        let bytes = mmap
            .get(r.start as usize..r.end as usize)
            .ok_or_else(|| EngineError::State(format!("tensor {src} outside the file")))?;
        ffi::tensor_set(*t, bytes);
    }
    Ok(())
}

/// The model's weights by role.
struct Weights {
    tok_embd: Tensor,
    output_norm: Tensor,
    output: Tensor,
    rope_freqs: Option<Tensor>,
    blocks: Vec<BlockWeights>,
}

/// The placed tensors by name.
struct Table<'a>(&'a HashMap<String, Tensor>);

impl Table<'_> {
    fn get(&self, name: &str) -> Option<Tensor> {
        self.0.get(name).copied()
    }

    fn need(&self, name: String) -> Result<Tensor> {
        self.0
            .get(&name)
            .copied()
            .ok_or(EngineError::MissingTensor { name })
    }

    /// The weight table: embeddings, LM head (the embeddings when shared), each block's.
    fn weights(&self, cfg: &ModelConfig, share_output_with_embd: bool) -> Result<Weights> {
        let tok_embd = self.need("token_embd.weight".into())?;
        let output = if share_output_with_embd {
            tok_embd
        } else {
            self.need("output.weight".into())?
        };
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            blocks.push(self.block(i, cfg)?);
        }
        Ok(Weights {
            output_norm: self.need("output_norm.weight".into())?,
            rope_freqs: self.get("rope_freqs.weight"),
            tok_embd,
            output,
            blocks,
        })
    }

    fn block(&self, i: usize, cfg: &ModelConfig) -> Result<BlockWeights> {
        let n = |s: &str| format!("blk.{i}.{s}");
        let (get, need) = (|s: &str| self.get(&n(s)), |s: &str| self.need(n(s)));
        Ok(BlockWeights {
            attn_norm: get("attn_norm.weight"),
            wqkv: get("attn_qkv.weight"),
            bqkv: get("attn_qkv.bias"),
            wq: get("attn_q.weight"),
            wk: get("attn_k.weight"),
            wv: get("attn_v.weight"),
            wo: need("attn_output.weight")?,
            bq: get("attn_q.bias"),
            bk: get("attn_k.bias"),
            bv: get("attn_v.bias"),
            bo: get("attn_output.bias"),
            q_norm: get("attn_q_norm.weight"),
            k_norm: get("attn_k_norm.weight"),
            attn_post_norm: get("post_attention_norm.weight"),
            ffn_norm: get("ffn_norm.weight"),
            ffn: match cfg.moe {
                Some(_) => FfnWeights::Experts {
                    gate_inp: need("ffn_gate_inp.weight")?,
                    gate: need("ffn_gate_exps.weight")?,
                    up: need("ffn_up_exps.weight")?,
                    down: need("ffn_down_exps.weight")?,
                },
                None => FfnWeights::Dense {
                    gate: get("ffn_gate.weight"),
                    up: need("ffn_up.weight")?,
                    down: need("ffn_down.weight")?,
                    gate_b: get("ffn_gate.bias"),
                    up_b: get("ffn_up.bias"),
                    down_b: get("ffn_down.bias"),
                },
            },
            ffn_post_norm: get("post_ffw_norm.weight"),
        })
    }
}

fn meta_tensor(meta: &GgmlCtx, name: &str) -> Option<Tensor> {
    let c = CString::new(name).ok()?;
    // SAFETY: lookup by name in a live context.
    let t = unsafe { sys::ggml_get_tensor(meta.ptr(), c.as_ptr()) };
    (!t.is_null()).then_some(t)
}

/// llama.cpp's `select_weight_buft`: the first buffer type whose device supports the op the
/// weight is used in, with the weight placed in a buffer of that type.
fn select_buft(
    w: Tensor,
    op: sys::ggml_op,
    list: &BuftList,
    cfg: &ModelConfig,
) -> Result<Option<sys::ggml_backend_buffer_type_t>> {
    for &(dev, buft) in list {
        let ctx = GgmlCtx::new(8, 0)?;
        // SAFETY: building a throwaway op in a scratch context; w is copied, not modified.
        let supported = unsafe {
            let wc = sys::ggml_dup_tensor(ctx.ptr(), w);
            let c = ctx.ptr();
            let op_t = match op {
                sys::GGML_OP_GET_ROWS => {
                    let b = sys::ggml_new_tensor_1d(c, sys::GGML_TYPE_I32, 512);
                    sys::ggml_get_rows(c, wc, b)
                }
                sys::GGML_OP_MUL_MAT => {
                    let b = sys::ggml_new_tensor_4d(
                        c,
                        sys::GGML_TYPE_F32,
                        (*wc).ne[0],
                        512,
                        (*wc).ne[2],
                        (*wc).ne[3],
                    );
                    sys::ggml_mul_mat(c, wc, b)
                }
                sys::GGML_OP_MUL_MAT_ID => {
                    // llama.cpp: the experts used per token, 512 tokens
                    let used = cfg.moe.map_or(1, |m| m.n_expert_used) as i64;
                    let b = sys::ggml_new_tensor_3d(c, sys::GGML_TYPE_F32, (*wc).ne[0], used, 512);
                    let ids = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_I32, used, 512);
                    sys::ggml_mul_mat_id(c, wc, b, ids)
                }
                sys::GGML_OP_ADD => {
                    let a = sys::ggml_new_tensor_4d(
                        c,
                        sys::GGML_TYPE_F32,
                        (*wc).ne[0],
                        (*wc).ne[1],
                        (*wc).ne[2],
                        (*wc).ne[3],
                    );
                    sys::ggml_add(c, a, wc)
                }
                sys::GGML_OP_MUL => {
                    let a = sys::ggml_new_tensor_4d(
                        c,
                        sys::GGML_TYPE_F32,
                        (*wc).ne[0],
                        (*wc).ne[1],
                        (*wc).ne[2],
                        (*wc).ne[3],
                    );
                    sys::ggml_mul(c, a, wc)
                }
                sys::GGML_OP_ROPE => {
                    let a = sys::ggml_new_tensor_3d(
                        c,
                        sys::GGML_TYPE_F32,
                        cfg.head_dim_k as i64,
                        cfg.n_head as i64,
                        512,
                    );
                    let b = sys::ggml_new_tensor_1d(c, sys::GGML_TYPE_I32, 512);
                    sys::ggml_rope_ext(c, a, b, wc, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
                }
                _ => return Ok(Some(buft)),
            };
            let dummy = sys::ggml_backend_buft_alloc_buffer(buft, 0);
            (*wc).buffer = dummy;
            let ok = sys::ggml_backend_dev_supports_op(dev, op_t);
            (*wc).buffer = std::ptr::null_mut();
            if !dummy.is_null() {
                sys::ggml_backend_buffer_free(dummy);
            }
            ok
        };
        if supported {
            return Ok(Some(buft));
        }
    }
    Ok(None)
}
