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
    layout(&clang, &ebpf, &out);
    println!("cargo:rustc-env=PATRONUS_EBPF_OUT_DIR={}", out.display());
}

/// The C side's struct sizes, field offsets and constants, as Rust constants in
/// `OUT_DIR/ebpf_layout.rs`: a host program compiled against `maps.h` prints them, and the
/// agent asserts its `#[repr(C)]` mirrors against them at compile time.
fn layout(clang: &str, ebpf: &Path, out: &Path) {
    const STRUCTS: &[(&str, &[&str])] = &[
        (
            "patronus_flow_key",
            &["src_addr", "dst_addr", "src_port", "dst_port", "protocol"],
        ),
        (
            "patronus_flow_value",
            &[
                "packets",
                "bytes",
                "first_seen_ns",
                "last_seen_ns",
                "path",
                "mark",
                "generation",
                "class_id",
                "policy_index",
                "site",
            ],
        ),
        (
            "patronus_policy_rule",
            &["class_id", "src_port_lo", "src_port_hi", "dscp"],
        ),
        ("patronus_prefix_key", &["prefixlen", "addr"]),
        ("patronus_policy_set", &["bits"]),
        (
            "patronus_class_paths",
            &[
                "generation",
                "lb_mode",
                "count",
                "flags",
                "pick",
                "paths",
                "weights",
            ],
        ),
        ("patronus_path", &["mark", "flags"]),
        ("patronus_dest", &["site"]),
        ("patronus_meta", &["magic", "mark"]),
    ];
    const CONSTANTS: &[&str] = &[
        "PATRONUS_MAX_FLOWS",
        "PATRONUS_MAX_POLICIES",
        "PATRONUS_MAX_CLASSES",
        "PATRONUS_MAX_PATHS",
        "PATRONUS_PATHS_PER_CLASS",
        "PATRONUS_MAX_SITES",
        "PATRONUS_MAX_DEST_PREFIXES",
        "PATRONUS_POLICY_WORDS",
        "PATRONUS_CNT_MAX",
        "PATRONUS_NO_PATH",
        "PATRONUS_NO_POLICY",
        "PATRONUS_CLASS_REPIN",
        "PATRONUS_META_MAGIC",
    ];
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"maps.h\"\nint main(void) {\n",
    );
    for (name, fields) in STRUCTS {
        let upper = name.to_uppercase();
        c.push_str(&format!(
            "printf(\"pub const SIZE_OF_{upper}: usize = %zu;\\n\", sizeof(struct {name}));\n"
        ));
        for field in *fields {
            let field_upper = field.to_uppercase();
            c.push_str(&format!(
                "printf(\"pub const OFFSET_OF_{upper}_{field_upper}: usize = %zu;\\n\", offsetof(struct {name}, {field}));\n"
            ));
        }
    }
    for name in CONSTANTS {
        c.push_str(&format!(
            "printf(\"pub const {name}: u64 = %llu;\\n\", (unsigned long long)({name}));\n"
        ));
    }
    c.push_str("return 0;\n}\n");
    let source = out.join("ebpf_layout.c");
    let program = out.join("ebpf_layout");
    std::fs::write(&source, c).expect("OUT_DIR is writable");
    let arch_include = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let status = Command::new(clang)
        .arg("-I")
        .arg(ebpf.join("include"))
        .arg("-I")
        .arg(&arch_include)
        .arg(&source)
        .arg("-o")
        .arg(&program)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {clang} for the eBPF layout ({e}); run scripts/setup")
        });
    assert!(status.success(), "compiling {} failed", source.display());
    let printed = Command::new(&program)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e})", program.display()));
    assert!(printed.status.success(), "{} failed", program.display());
    std::fs::write(out.join("ebpf_layout.rs"), printed.stdout).expect("OUT_DIR is writable");
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
