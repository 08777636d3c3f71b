//! Feeds arbitrary bytes to the GGUF reader and the sidecar reader: they must return Ok or
//! Err, never panic, hang or allocate without bound. What parses must validate and write back.
#![no_main]

use drllm_router_format::{base_model_info_from_bytes, Sidecar, StorageType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = drllm_gguf::GgufFile::parse(data);
    let _ = base_model_info_from_bytes(data);
    // (small inputs only: an F16 file near the size cap could not be rewritten as F32)
    if let (Ok(sc), true) = (Sidecar::parse(data), data.len() < 1 << 20) {
        assert!(sc.validate().is_ok(), "a parsed sidecar must be valid");
        let bytes = sc
            .to_bytes(StorageType::F32)
            .expect("a parsed sidecar must write back");
        let again = Sidecar::parse(&bytes).expect("a written sidecar must parse");
        assert_eq!(again, sc, "F32 round trip must be exact");
    }
});
