//! Compile the C eBPF programs in `edge-ebpf/src` with clang `-target bpf` into OUT_DIR, so a
//! program the compiler rejects fails the agent's build. `scripts/setup` installs clang and
//! libbpf-dev.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let ebpf = manifest.join("../edge-ebpf");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed={}", ebpf.display());
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());

    let mut sources: Vec<PathBuf> = std::fs::read_dir(ebpf.join("src"))
        .expect("edge-ebpf/src exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    sources.sort();
    for source in &sources {
        compile(&clang, &ebpf, source, &out);
    }
    println!("cargo:rustc-env=PATRONUS_EBPF_OUT_DIR={}", out.display());
}

fn compile(clang: &str, ebpf: &Path, source: &Path, out: &Path) {
    let stem = source
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("C file names are UTF-8");
    let object = out.join(format!("{stem}.o"));
    let arch_include = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let status = Command::new(clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg("-I")
        .arg(ebpf.join("include"))
        .arg("-I")
        .arg(&arch_include)
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(&object)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang failed ({s}) compiling {}", source.display()),
        Err(e) => panic!(
            "cannot run {clang} to compile the eBPF programs ({e}); run scripts/setup, which installs clang and libbpf-dev"
        ),
    }
}
