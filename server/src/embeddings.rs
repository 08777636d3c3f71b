//! `POST /v1/embeddings`: OpenAI's request (a string, a list of strings, a list of token ids
//! or a list of such lists; `encoding_format` float or base64) and answer (unit vectors,
//! pooled as the server's `pooling` says, each input along its own routed path).

use crate::api::{parse_json, ApiError};
use drllm_engine::Tokenizer;
use serde_json::{json, Value};

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// A parsed and checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingRequest {
    /// The inputs, tokenized (each non-empty, shorter than the context).
    pub inputs: Vec<Vec<i32>>,
    pub base64: bool,
    pub routing: Option<bool>,
    pub depth_bias: f32,
    pub max_passes: Option<usize>,
}

fn bad(message: String, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

impl EmbeddingRequest {
    /// Parses a body: `input` and `model` (any name), `encoding_format`, `user`, drllm's
    /// routing fields; `dimensions` only as null (the model's size is the size). Every other
    /// field is refused by name.
    pub fn from_body(
        bytes: &[u8],
        tok: &Tokenizer,
        n_ctx: usize,
        n_layer: usize,
    ) -> Result<Self, ApiError> {
        let v = parse_json(bytes)?;
        let obj = v
            .as_object()
            .ok_or_else(|| ApiError::invalid("expected an object", None))?;
        for (k, x) in obj {
            let known = matches!(
                k.as_str(),
                "input"
                    | "model"
                    | "encoding_format"
                    | "user"
                    | "routing"
                    | "depth_bias"
                    | "max_passes"
            ) || x.is_null();
            if !known {
                let why = if k == "dimensions" {
                    "'dimensions' is not supported: embeddings have the model's hidden size".into()
                } else {
                    format!("unknown or unsupported field '{k}'")
                };
                return Err(bad(why, k).with_code("unsupported_parameter"));
            }
        }
        let base64 = match obj.get("encoding_format").and_then(Value::as_str) {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(bad(
                    format!("encoding_format must be float or base64 (got '{other}')"),
                    "encoding_format",
                ))
            }
        };
        let inputs = inputs(obj.get("input"), tok, n_ctx)?;
        let routing = match obj.get("routing") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => return Err(bad("routing must be true or false".into(), "routing")),
        };
        let depth_bias = match obj.get("depth_bias").filter(|x| !x.is_null()) {
            None => 0.0,
            Some(x) => match x.as_f64() {
                Some(b) if b.is_finite() && b.abs() <= 1e4 => b as f32,
                _ => {
                    return Err(bad(
                        "depth_bias must be a number in [-1e4, 1e4]".into(),
                        "depth_bias",
                    ))
                }
            },
        };
        let max_passes = match obj.get("max_passes").filter(|x| !x.is_null()) {
            None => None,
            Some(x) => match x.as_u64() {
                Some(p) if p >= 1 && p as usize <= 2 * n_layer => Some(p as usize),
                _ => {
                    return Err(bad(
                        format!("max_passes must be between 1 and {}", 2 * n_layer),
                        "max_passes",
                    ))
                }
            },
        };
        Ok(EmbeddingRequest {
            inputs,
            base64,
            routing,
            depth_bias,
            max_passes,
        })
    }
}

/// The token ids of `input`: a string, a list of strings, a list of ids, a list of lists.
fn inputs(input: Option<&Value>, tok: &Tokenizer, n_ctx: usize) -> Result<Vec<Vec<i32>>, ApiError> {
    let n_vocab = tok.n_vocab() as i64;
    let ids = |a: &[Value], at: &str| -> Result<Vec<i32>, ApiError> {
        a.iter()
            .map(|t| match t.as_i64() {
                Some(t) if (0..n_vocab).contains(&t) => Ok(t as i32),
                _ => Err(bad(
                    format!("{at}: {t} is not a token id (0..{n_vocab})"),
                    "input",
                )),
            })
            .collect()
    };
    let text = |s: &str| tok.tokenize(s, true, false);
    let list: Vec<Vec<i32>> = match input {
        None | Some(Value::Null) => return Err(bad("input is required".into(), "input")),
        Some(Value::String(s)) => vec![text(s)],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().map(|s| text(s.as_str().unwrap_or(""))).collect()
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => vec![ids(a, "input")?],
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => a
            .iter()
            .enumerate()
            .map(|(i, x)| ids(x.as_array().map_or(&[][..], Vec::as_slice), &format!("input[{i}]")))
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(bad(
                "input must be a string, a list of strings, a list of token ids, or a list of such lists".into(),
                "input",
            ))
        }
    };
    if list.is_empty() || list.len() > MAX_INPUTS {
        return Err(bad(
            format!("input takes 1 to {MAX_INPUTS} items (got {})", list.len()),
            "input",
        ));
    }
    for (i, t) in list.iter().enumerate() {
        // a string tokenizes to its BOS at least: an empty one has nothing to embed
        let empty = t.is_empty() || t.iter().all(|&x| tok.token_bytes(x).is_empty());
        if empty {
            return Err(bad(format!("input[{i}] is empty"), "input"));
        }
        if t.len() > n_ctx {
            return Err(bad(
                format!("input[{i}] has {} tokens; the context is {n_ctx}", t.len()),
                "input",
            )
            .with_code("context_length_exceeded"));
        }
    }
    Ok(list)
}

/// Standard base64 (RFC 4648, padded) of bytes.
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(char::from(ABC[(n >> shift) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// OpenAI's list of embeddings: floats, or base64 of little-endian f32 (what the SDKs ask for
/// by default and decode).
pub fn data(embeddings: &[Vec<f32>], base64_format: bool) -> Value {
    let items: Vec<Value> = embeddings
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let embedding = if base64_format {
                let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64(&bytes))
            } else {
                json!(e)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!(items)
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_is_rfc_4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }
}
