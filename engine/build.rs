//! Compiles `cpp/chat.cpp`, drllm's shim over llama.cpp's chat layer (`common/chat.h`),
//! against the llama.cpp sources that llama-cpp-sys-2 builds and links (its `common`
//! library), as llama-cpp-sys-2 compiles its own `wrapper_common.cpp`.
//!
//! Where those sources are: llama-cpp-sys-2 tells its dependents its CMake install folder
//! (`DEP_LLAMA_GGML_CMAKE_DIR`, `OUT_DIR/lib/cmake`); the CMake cache of that build names the
//! source folder (`CMAKE_HOME_DIRECTORY`). `DRLLM_LLAMA_CPP_SRC` overrides it.

use std::path::{Path, PathBuf};

fn llama_src() -> Result<PathBuf, String> {
    println!("cargo:rerun-if-env-changed=DRLLM_LLAMA_CPP_SRC");
    if let Ok(p) = std::env::var("DRLLM_LLAMA_CPP_SRC") {
        return Ok(PathBuf::from(p));
    }
    let cmake_dir = std::env::var("DEP_LLAMA_GGML_CMAKE_DIR").map_err(|_| {
        "llama-cpp-sys-2 did not say where its build is (DEP_LLAMA_GGML_CMAKE_DIR); set \
         DRLLM_LLAMA_CPP_SRC to its llama.cpp folder"
            .to_string()
    })?;
    let out_dir = Path::new(&cmake_dir)
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected DEP_LLAMA_GGML_CMAKE_DIR {cmake_dir}"))?;
    let cache = out_dir.join("build").join("CMakeCache.txt");
    let text =
        std::fs::read_to_string(&cache).map_err(|e| format!("reading {}: {e}", cache.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("CMAKE_HOME_DIRECTORY:INTERNAL="))
        .map(PathBuf::from)
        .ok_or_else(|| format!("{} names no CMAKE_HOME_DIRECTORY", cache.display()))
}

fn main() {
    println!("cargo:rerun-if-changed=cpp/chat.cpp");
    let src = match llama_src() {
        Ok(p) => p,
        Err(e) => panic!("drllm-engine: cannot find the llama.cpp sources: {e}"),
    };
    if !src.join("common").join("chat.h").is_file() {
        panic!(
            "drllm-engine: {} holds no common/chat.h (set DRLLM_LLAMA_CPP_SRC)",
            src.display()
        );
    }
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("cpp/chat.cpp")
        .include(&src)
        .include(src.join("common"))
        .include(src.join("include"))
        .include(src.join("ggml/include"))
        .include(src.join("vendor"))
        .flag_if_supported("-std=c++17")
        .pic(true)
        // llama.cpp's headers define static helpers this file does not use
        .warnings(false);
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("msvc") {
        b.flag("/std:c++17");
    }
    if std::env::var("CARGO_CFG_TARGET_VENDOR").as_deref() == Ok("apple") {
        // llama-cpp-sys-2 links libc++ itself
        b.cpp_link_stdlib(None);
    }
    b.compile("drllm_chat_shim");
}
