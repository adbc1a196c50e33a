//! Reads a built kernel tree: a user's own (`--kernel-dir`) or one that
//! images/build-kernel.sh built, through the same code. A tree is what `make`
//! leaves behind, nothing more: an in-tree build (`make` in the sources) or an
//! `O=` build directory (its `source` symlink leads to the sources), built
//! with gcc or with `LLVM=1`/`LLVM=-N`, which is read from the tree.

use crate::cli::{Arch, Flavour};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use thiserror::Error;

/// What is wrong with a kernel tree, each with what to do about it.
#[derive(Debug, Error)]
pub enum TreeError {
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "{dir} is not a kernel tree: no .config (a configured tree, in-tree or O=) \
         and no Kconfig and Makefile (kernel sources)"
    )]
    NotATree { dir: PathBuf },
    #[error(
        "{dir} holds kernel sources but is not configured (no .config); e.g. with \
         hmmgpu's fragments on top of allnoconfig:\n  {fix}"
    )]
    NotConfigured { dir: PathBuf, fix: String },
    #[error(
        "{dir} has a .config but no kernel sources: neither {dir}/source (an O= build \
         directory's link to its sources) nor an in-tree Makefile and Kconfig"
    )]
    NoSources { dir: PathBuf },
    #[error("{dir} is {what}: hmmgpu boots x86_64 and ppc64le guests")]
    UnsupportedArch { dir: PathBuf, what: String },
    #[error("{dir} is built for {found}, not {wanted}: {hint}")]
    OtherArch {
        dir: PathBuf,
        found: &'static str,
        wanted: &'static str,
        hint: String,
    },
    #[error(
        "{dir} is configured but not built (no {}): build it first:\n  {make}",
        missing.join(", no ")
    )]
    NotBuilt {
        dir: PathBuf,
        missing: Vec<String>,
        make: String,
    },
    #[error(
        "{dir}: the .config changed after the last build (it is newer than \
         include/config/auto.conf, which make writes): build it again:\n  {make}"
    )]
    ConfigNewerThanBuild { dir: PathBuf, make: String },
    #[error("{dir}: {why}")]
    UnknownCompiler { dir: PathBuf, why: String },
    #[error(
        "{dir} lacks kernel options hmmgpu needs ({} of images/config/{}):\n{}\n{fix}",
        missing.len(),
        fragments.join(", images/config/"),
        missing.iter().map(|m| format!("  {m}")).collect::<Vec<_>>().join("\n")
    )]
    MissingOptions {
        dir: PathBuf,
        fragments: Vec<String>,
        missing: Vec<Missing>,
        fix: String,
    },
    #[error("{0}")]
    Io(String),
}

/// One fragment line a tree's .config does not satisfy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// Without the CONFIG_ prefix.
    pub symbol: String,
    pub wanted: String,
    /// None: not set.
    pub got: Option<String>,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CONFIG_{}={} wanted, {}",
            self.symbol,
            self.wanted,
            match &self.got {
                Some(g) => format!("it is {g}"),
                None => "it is not set".to_string(),
            }
        )
    }
}

/// A configured and built kernel tree.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Where make ran: .config, the image, the modules (the O= directory, or
    /// the sources for an in-tree build).
    pub build: PathBuf,
    /// The kernel sources (the same as `build` for an in-tree build).
    pub source: PathBuf,
    pub arch: Arch,
    /// `make kernelrelease` (include/config/kernel.release).
    pub release: String,
    /// The make variables a build against this tree needs (ARCH, LLVM,
    /// CROSS_COMPILE, CC), as read from the tree.
    pub make_vars: Vec<String>,
    /// The bootable image.
    pub image: PathBuf,
    /// lib/test_hmm.ko (CONFIG_TEST_HMM=m).
    pub test_hmm: Option<PathBuf>,
    /// The compiler that built it, for the log ("gcc", "clang-19").
    pub compiler: String,
}

impl Kernel {
    pub fn image(&self) -> PathBuf {
        self.image.clone()
    }

    pub fn in_tree(&self) -> bool {
        self.build == self.source
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        format!(
            "{} {} ({}, {}{})",
            self.release,
            self.arch.as_str(),
            self.compiler,
            if self.in_tree() {
                format!("in-tree build {}", self.build.display())
            } else {
                format!(
                    "O= tree {} of {}",
                    self.build.display(),
                    self.source.display()
                )
            },
            if self.test_hmm.is_some() {
                ", with test_hmm.ko"
            } else {
                ""
            }
        )
    }
}

/// The image `make` builds for a guest architecture.
fn image_path(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "arch/x86/boot/bzImage",
        Arch::Ppc64le => "vmlinux",
    }
}

/// The fragments (images/config/*.config) a tree of `arch` and `flavour`
/// must satisfy: base, the architecture's, and debug.config for the debug
/// flavour.
pub fn fragment_names(arch: Arch, flavour: Flavour) -> Vec<String> {
    let mut v = vec![
        "base.config".to_string(),
        format!("{}.config", arch.as_str()),
    ];
    match flavour {
        Flavour::Release => {}
        Flavour::Debug => v.push("debug.config".to_string()),
        Flavour::Gcov => v.push("gcov.config".to_string()),
    }
    v
}

/// A fragment line hmmgpu checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub symbol: String,
    pub value: String,
}

/// Marks the next CONFIG_ line of a fragment as a means to another line's
/// end (merged, not checked), e.g. what turns on a hidden option.
pub const NOT_CHECKED: &str = "# hmmgpu: not checked";

/// The checked lines of a fragment: every `CONFIG_X=V` not preceded by
/// [`NOT_CHECKED`].
pub fn parse_fragment(text: &str) -> Vec<Wanted> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for line in text.lines() {
        let l = line.trim();
        if l == NOT_CHECKED {
            skip_next = true;
            continue;
        }
        if let Some(rest) = l.strip_prefix("CONFIG_") {
            if let Some((sym, val)) = rest.split_once('=') {
                if !std::mem::take(&mut skip_next) {
                    out.push(Wanted {
                        symbol: sym.to_string(),
                        value: val.to_string(),
                    });
                }
            }
        }
    }
    out
}

/// A .config: symbol (without CONFIG_) -> value; unset symbols are absent.
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("CONFIG_"))
        .filter_map(|r| r.split_once('='))
        .map(|(s, v)| (s.to_string(), v.to_string()))
        .collect()
}

/// Whether `got` satisfies a fragment's `wanted`: y and m exactly (a module
/// hmmgpu loads by name must be one, and built-in code cannot be a module);
/// a number is a minimum (NR_CPUS=8: at least 8).
fn satisfies(wanted: &str, got: Option<&str>) -> bool {
    let Some(got) = got else {
        return wanted == "n";
    };
    if let (Ok(w), Ok(g)) = (wanted.parse::<i64>(), got.parse::<i64>()) {
        return g >= w;
    }
    got == wanted
}

/// The fragment lines `config` does not satisfy.
pub fn check_options(config: &BTreeMap<String, String>, wanted: &[Wanted]) -> Vec<Missing> {
    wanted
        .iter()
        .filter(|w| !satisfies(&w.value, config.get(&w.symbol).map(String::as_str)))
        .map(|w| Missing {
            symbol: w.symbol.clone(),
            wanted: w.value.clone(),
            got: config.get(&w.symbol).cloned(),
        })
        .collect()
}

/// `scripts/config` arguments that set the missing options.
fn scripts_config_args(missing: &[Missing]) -> String {
    missing
        .iter()
        .map(|m| match m.wanted.as_str() {
            "y" => format!("-e {}", m.symbol),
            "m" => format!("-m {}", m.symbol),
            "n" => format!("-d {}", m.symbol),
            v => format!("--set-val {} {v}", m.symbol),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes a path for a shell command line, when it needs it.
fn sh(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The `make` command that builds `build` (with `vars`).
fn make_command(build: &Path, vars: &[String]) -> String {
    make_target(build, vars, "-j$(nproc)")
}

/// `make -C BUILD VARS... TARGET`, ready to paste.
fn make_target(build: &Path, vars: &[String], target: &str) -> String {
    let mut m = format!("make -C {}", sh(build));
    for v in vars {
        m.push(' ');
        m.push_str(v);
    }
    format!("{m} {target}")
}

/// The compiler line of a built object: `savedcmd_init/main.o := CC ...`.
fn compiler_of(build: &Path) -> Result<Option<Vec<String>>, TreeError> {
    let cmd = build.join("init/.main.o.cmd");
    let Ok(text) = std::fs::read_to_string(&cmd) else {
        return Ok(None);
    };
    let first = text.lines().next().unwrap_or("");
    let Some((_, command)) = first.split_once(":=") else {
        return Err(TreeError::UnknownCompiler {
            dir: build.to_path_buf(),
            why: format!("{} has no `:=` command line", cmd.display()),
        });
    };
    // The compiler is every word before the first option (`ccache gcc`).
    Ok(Some(
        command
            .split_whitespace()
            .take_while(|w| !w.starts_with('-'))
            .map(str::to_string)
            .collect(),
    ))
}

/// The make variables that select the compiler `cc` (words of the command),
/// for a tree whose .config says clang or not.
fn compiler_vars(cc: &[String], clang: bool) -> Result<(Vec<String>, String), String> {
    let Some(last) = cc.last() else {
        return Err("no compiler in init/.main.o.cmd".into());
    };
    let (dir, name) = match last.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, last.as_str()),
    };
    let simple = cc.len() == 1;
    if clang {
        let Some(suffix) = name.strip_prefix("clang") else {
            return Err(format!(
                "CONFIG_CC_IS_CLANG=y, but init/main.o was compiled by `{}`",
                cc.join(" ")
            ));
        };
        // LLVM=1 (clang), LLVM=-19 (clang-19), LLVM=/usr/lib/llvm-19/bin/.
        let llvm = match (dir, suffix) {
            (None, "") => "LLVM=1".to_string(),
            (None, s) if s.starts_with('-') => format!("LLVM={s}"),
            (Some(d), "") => format!("LLVM={d}/"),
            _ => {
                return Err(format!(
                    "cannot tell the LLVM= of a tree compiled by `{}`",
                    cc.join(" ")
                ))
            }
        };
        let mut vars = vec![llvm];
        if !simple {
            vars.push(format!("CC={}", cc.join(" ")));
        }
        Ok((vars, name.to_string()))
    } else {
        let mut vars = Vec::new();
        if !simple || dir.is_some() {
            vars.push(format!("CC={}", cc.join(" ")));
        } else if let Some(prefix) = name.strip_suffix("gcc").filter(|p| !p.is_empty()) {
            // powerpc64le-linux-gnu-gcc: CROSS_COMPILE=powerpc64le-linux-gnu-
            vars.push(format!("CROSS_COMPILE={prefix}"));
        } else if name != "gcc" {
            vars.push(format!("CC={name}"));
        }
        Ok((vars, name.to_string()))
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The fix for missing options, ready to paste: scripts/config for exactly
/// those, or merging the whole fragments (which also brings their
/// dependencies, which scripts/config does not).
fn fix_for_options(
    build: &Path,
    source: &Path,
    fragments: &[PathBuf],
    missing: &[Missing],
    make_vars: &[String],
) -> String {
    let mut s = String::new();
    let olddef = make_target(build, make_vars, "olddefconfig");
    let _ = writeln!(
        s,
        "set them with scripts/config, then let Kconfig resolve them and build:\n  \
         {}/scripts/config --file {}/.config {}\n  {olddef}\n  {}",
        sh(source),
        sh(build),
        scripts_config_args(missing),
        make_command(build, make_vars)
    );
    let _ = write!(
        s,
        "or merge hmmgpu's fragments (they also carry the options these depend on):\n  \
         {}/scripts/kconfig/merge_config.sh -m -O {} {}/.config {}\n  {olddef}\n  {}",
        sh(source),
        sh(build),
        sh(build),
        fragments
            .iter()
            .map(|f| sh(f))
            .collect::<Vec<_>>()
            .join(" "),
        make_command(build, make_vars)
    );
    // Kconfig drops RUST without a word when it finds no usable toolchain
    // (RUST_IS_AVAILABLE), so setting it again would not stick.
    if missing.iter().any(|m| m.symbol == "RUST") {
        let _ = write!(
            s,
            "\nCONFIG_RUST stays unset while the kernel finds no usable Rust toolchain \
             (the olddefconfig above drops it again); this says what it lacks \
             (libclang for bindgen: LIBCLANG_PATH; the standard library's sources: \
             RUST_LIB_SRC or `rustup component add rust-src`):\n  {}",
            make_target(build, make_vars, "rustavailable")
        );
    }
    s
}

/// What a .config's header says it is: `# Linux/x86 7.2.12 Kernel Configuration`.
fn config_srcarch(config_text: &str) -> Option<String> {
    config_text.lines().take(6).find_map(|l| {
        let rest = l.strip_prefix("# Linux/")?;
        Some(rest.split_whitespace().next()?.to_string())
    })
}

/// The guest architecture of a .config, or a description of what it is.
fn config_arch(cfg: &BTreeMap<String, String>, srcarch: Option<&str>) -> Result<Arch, String> {
    let y = |s: &str| cfg.get(s).is_some_and(|v| v == "y");
    if y("X86_64") {
        Ok(Arch::X86_64)
    } else if y("PPC64") && y("CPU_LITTLE_ENDIAN") {
        Ok(Arch::Ppc64le)
    } else if y("PPC64") {
        Err("a big-endian ppc64 kernel".into())
    } else if y("X86_32") {
        Err("a 32-bit x86 kernel".into())
    } else {
        Err(format!(
            "a kernel for {}",
            srcarch.unwrap_or("an unknown architecture")
        ))
    }
}

impl Kernel {
    /// Reads the built kernel tree `dir` for an `arch` guest and checks it
    /// against images/config's fragments for `flavour` (in `config_dir`).
    pub fn open(
        dir: &Path,
        arch: Arch,
        flavour: Flavour,
        config_dir: &Path,
    ) -> Result<Kernel, TreeError> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            TreeError::Io(format!("{what} {}: {e}", p.display()))
        };
        if !dir.is_dir() {
            return Err(TreeError::NotADirectory(dir.to_path_buf()));
        }
        let build = dir.canonicalize().map_err(|e| io("resolving", dir, e))?;
        let fragments: Vec<PathBuf> = fragment_names(arch, flavour)
            .iter()
            .map(|f| config_dir.join(f))
            .collect();
        let frags = fragments
            .iter()
            .map(|f| sh(f))
            .collect::<Vec<_>>()
            .join(" ");
        // The sources: an O= directory links to them, an in-tree build is them.
        let in_tree = build.join("Kconfig").is_file() && build.join("Makefile").is_file();
        let config_path = build.join(".config");
        if !config_path.is_file() {
            if !in_tree {
                return Err(TreeError::NotATree { dir: build });
            }
            let b = sh(&build);
            return Err(TreeError::NotConfigured {
                fix: format!(
                    "make -C {b} allnoconfig\n  {b}/scripts/kconfig/merge_config.sh -m -O {b} {b}/.config {frags}\n  \
                     make -C {b} olddefconfig\n  make -C {b} -j$(nproc)"
                ),
                dir: build,
            });
        }
        let source = if build.join("source").exists() {
            build
                .join("source")
                .canonicalize()
                .map_err(|e| io("resolving", &build.join("source"), e))?
        } else if in_tree {
            build.clone()
        } else {
            return Err(TreeError::NoSources { dir: build });
        };
        let config_text =
            std::fs::read_to_string(&config_path).map_err(|e| io("reading", &config_path, e))?;
        let config = parse_config(&config_text);
        let srcarch = config_srcarch(&config_text);
        let found = config_arch(&config, srcarch.as_deref()).map_err(|what| {
            TreeError::UnsupportedArch {
                dir: build.clone(),
                what,
            }
        })?;
        if found != arch {
            return Err(TreeError::OtherArch {
                dir: build.clone(),
                found: found.as_str(),
                wanted: arch.as_str(),
                hint: format!(
                    "boot it with --arch {} (or give a {} tree)",
                    found.as_str(),
                    arch.as_str()
                ),
            });
        }
        // make's default ARCH is the host's; another architecture's tree
        // needs its own (from the .config's header, e.g. `Linux/powerpc`).
        let mut make_vars = Vec::new();
        if !arch.is_host() {
            make_vars.push(format!(
                "ARCH={}",
                srcarch.clone().unwrap_or_else(|| match arch {
                    Arch::X86_64 => "x86".into(),
                    Arch::Ppc64le => "powerpc".into(),
                })
            ));
        }

        // The compiler, from a built object's command line (and, until the
        // tree is built, from the .config, for the make command we suggest).
        let clang = config.get("CC_IS_CLANG").is_some_and(|v| v == "y");
        let cc = compiler_of(&build)?;
        let (cc_vars, compiler) = match &cc {
            Some(words) => {
                compiler_vars(words, clang).map_err(|why| TreeError::UnknownCompiler {
                    dir: build.clone(),
                    why,
                })?
            }
            None if clang => (vec!["LLVM=1".to_string()], "clang".to_string()),
            None => (Vec::new(), "gcc".to_string()),
        };
        make_vars.extend(cc_vars);

        // The options before "not built": a tree that lacks some must be
        // configured again before a build is worth its time.
        let mut wanted = Vec::new();
        for f in &fragments {
            let text = std::fs::read_to_string(f).map_err(|e| io("reading", f, e))?;
            wanted.extend(parse_fragment(&text));
        }
        let missing = check_options(&config, &wanted);
        if !missing.is_empty() {
            return Err(TreeError::MissingOptions {
                fix: fix_for_options(&build, &source, &fragments, &missing, &make_vars),
                dir: build,
                fragments: fragment_names(arch, flavour),
                missing,
            });
        }

        // Built: make wrote these; a configured-only tree has none of them.
        let image = build.join(image_path(arch));
        let mut missing_files = Vec::new();
        let auto_conf = build.join("include/config/auto.conf");
        if !auto_conf.is_file() {
            missing_files.push("include/config/auto.conf".to_string());
        }
        if cc.is_none() {
            missing_files.push("init/main.o".to_string());
        }
        if !image.is_file() {
            missing_files.push(image_path(arch).to_string());
        }
        if config.get("MODULES").is_some_and(|v| v == "y")
            && !build.join("Module.symvers").is_file()
        {
            missing_files.push("Module.symvers".to_string());
        }
        if !missing_files.is_empty() {
            return Err(TreeError::NotBuilt {
                dir: build.clone(),
                missing: missing_files,
                make: make_command(&build, &make_vars),
            });
        }
        if let (Some(c), Some(a)) = (mtime(&config_path), mtime(&auto_conf)) {
            if c > a {
                return Err(TreeError::ConfigNewerThanBuild {
                    dir: build.clone(),
                    make: make_command(&build, &make_vars),
                });
            }
        }

        let release_file = build.join("include/config/kernel.release");
        let release = std::fs::read_to_string(&release_file)
            .map_err(|e| io("reading", &release_file, e))?
            .trim()
            .to_string();
        let test_hmm = Some(build.join("lib/test_hmm.ko")).filter(|p| p.is_file());
        if config.get("TEST_HMM").is_some_and(|v| v == "m") && test_hmm.is_none() {
            return Err(TreeError::NotBuilt {
                dir: build.clone(),
                missing: vec!["lib/test_hmm.ko (CONFIG_TEST_HMM=m)".into()],
                make: make_command(&build, &make_vars),
            });
        }
        Ok(Kernel {
            build,
            source,
            arch,
            release,
            make_vars,
            image,
            test_hmm,
            compiler,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_lines_and_the_not_checked_marker() {
        let w = parse_fragment(
            "# c\nCONFIG_A=y\n# hmmgpu: not checked\nCONFIG_B=m\nCONFIG_C=8\n\n# CONFIG_D is not set\n",
        );
        let syms: Vec<_> = w.iter().map(|w| w.symbol.as_str()).collect();
        assert_eq!(syms, ["A", "C"]);
    }

    #[test]
    fn committed_fragments() {
        let base = parse_fragment(include_str!("../../../../images/config/base.config"));
        let has = |s: &str| base.iter().any(|w| w.symbol == s);
        // What hmmgpu needs is checked; what only turns it on is not.
        assert!(has("GPU_BUDDY") && has("DEVICE_PRIVATE") && has("TEST_HMM"));
        assert!(!has("DRM") && !has("DRM_KUNIT_TEST") && !has("KUNIT"));
        for f in [
            include_str!("../../../../images/config/x86_64.config"),
            include_str!("../../../../images/config/ppc64le.config"),
            include_str!("../../../../images/config/debug.config"),
        ] {
            assert!(!parse_fragment(f).is_empty());
        }
    }

    #[test]
    fn option_semantics() {
        let cfg = parse_config("CONFIG_A=y\nCONFIG_M=m\nCONFIG_N=64\n# CONFIG_U is not set\n");
        let want = |s: &str, v: &str| Wanted {
            symbol: s.into(),
            value: v.into(),
        };
        assert!(check_options(&cfg, &[want("A", "y"), want("M", "m"), want("N", "8")]).is_empty());
        let miss = check_options(
            &cfg,
            &[
                want("A", "m"),
                want("M", "y"),
                want("N", "128"),
                want("U", "y"),
            ],
        );
        assert_eq!(miss.len(), 4);
        assert_eq!(miss[3].got, None);
        assert_eq!(scripts_config_args(&miss), "-m A -e M --set-val N 128 -e U");
        assert_eq!(miss[3].to_string(), "CONFIG_U=y wanted, it is not set");
    }

    #[test]
    fn compiler_from_the_tree() {
        let w = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            compiler_vars(&w("gcc"), false).unwrap().0,
            Vec::<String>::new()
        );
        assert_eq!(
            compiler_vars(&w("powerpc64le-linux-gnu-gcc"), false)
                .unwrap()
                .0,
            ["CROSS_COMPILE=powerpc64le-linux-gnu-"]
        );
        assert_eq!(compiler_vars(&w("gcc-12"), false).unwrap().0, ["CC=gcc-12"]);
        assert_eq!(compiler_vars(&w("clang"), true).unwrap().0, ["LLVM=1"]);
        assert_eq!(compiler_vars(&w("clang-19"), true).unwrap().0, ["LLVM=-19"]);
        assert_eq!(
            compiler_vars(&w("/usr/lib/llvm-19/bin/clang"), true)
                .unwrap()
                .0,
            ["LLVM=/usr/lib/llvm-19/bin/"]
        );
        assert_eq!(
            compiler_vars(&w("ccache gcc"), false).unwrap().0,
            ["CC=ccache gcc"]
        );
        assert!(compiler_vars(&w("gcc"), true).is_err());
    }

    /// A directory under the system's temp dir, removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Scratch {
            let d = std::env::temp_dir().join(format!("hmmgpu-tree-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Scratch(d)
        }
        fn put(&self, rel: &str, text: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const CONFIG: &str = "#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86 7.2.12 Kernel Configuration\n#\n\
        CONFIG_CC_IS_CLANG=y\nCONFIG_X86_64=y\nCONFIG_MODULES=y\nCONFIG_DEVICE_PRIVATE=y\nCONFIG_TEST_HMM=m\nCONFIG_NR_CPUS=64\n";

    /// A built x86_64 tree (what make leaves: the files the reader looks
    /// at) in `dir`, and fragments wanting what CONFIG has.
    fn built_tree(t: &Scratch, build: &str) -> (PathBuf, PathBuf) {
        let frags = t.0.join("frags");
        t.put("frags/base.config", "CONFIG_DEVICE_PRIVATE=y\nCONFIG_TEST_HMM=m\nCONFIG_NR_CPUS=8\n# hmmgpu: not checked\nCONFIG_DRM=m\n");
        t.put("frags/x86_64.config", "CONFIG_X86_64=y\n");
        t.put(&format!("{build}/.config"), CONFIG);
        for f in [
            "include/config/auto.conf",
            "arch/x86/boot/bzImage",
            "Module.symvers",
            "lib/test_hmm.ko",
        ] {
            t.put(&format!("{build}/{f}"), "");
        }
        t.put(
            &format!("{build}/include/config/kernel.release"),
            "7.2.12\n",
        );
        t.put(
            &format!("{build}/init/.main.o.cmd"),
            "savedcmd_init/main.o := clang-19 -Wp,-MMD,init/.main.o.d -nostdinc\n",
        );
        (t.0.join(build), frags)
    }

    #[test]
    fn reads_a_built_tree_and_says_what_is_wrong() {
        let t = Scratch::new("read");
        t.put("src/Kconfig", "");
        t.put("src/Makefile", "");
        t.put("src/lib/test_hmm_uapi.h", "");
        let (build, frags) = built_tree(&t, "build");
        std::os::unix::fs::symlink(t.0.join("src"), build.join("source")).unwrap();
        let open = |arch| Kernel::open(&build, arch, Flavour::Release, &frags);
        let k = open(Arch::X86_64).unwrap();
        assert_eq!(k.make_vars, ["LLVM=-19"]);
        assert_eq!(k.release, "7.2.12");
        assert_eq!(k.source, t.0.join("src").canonicalize().unwrap());
        assert!(!k.in_tree() && k.test_hmm.is_some());

        // Another architecture.
        let e = open(Arch::Ppc64le).unwrap_err().to_string();
        assert!(e.contains("built for x86_64, not ppc64le"), "{e}");
        // An option missing: listed, with the lines that set it.
        t.put(
            "frags/x86_64.config",
            "CONFIG_X86_64=y\nCONFIG_ZONE_DEVICE=y\n",
        );
        let e = open(Arch::X86_64).unwrap_err().to_string();
        assert!(
            e.contains("CONFIG_ZONE_DEVICE=y wanted, it is not set"),
            "{e}"
        );
        assert!(
            e.contains("/scripts/config --file ") && e.contains(" -e ZONE_DEVICE"),
            "{e}"
        );
        assert!(
            e.contains("merge_config.sh -m") && e.contains("LLVM=-19 olddefconfig"),
            "{e}"
        );
        assert!(!e.contains("rustavailable"), "{e}");
        // RUST missing: how to find out why Kconfig dropped it.
        t.put("frags/x86_64.config", "CONFIG_X86_64=y\nCONFIG_RUST=y\n");
        let e = open(Arch::X86_64).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "make -C {} LLVM=-19 rustavailable",
                build.display()
            )),
            "{e}"
        );
        t.put("frags/x86_64.config", "CONFIG_X86_64=y\n");
        // Configured, not built.
        std::fs::remove_file(build.join("arch/x86/boot/bzImage")).unwrap();
        let e = open(Arch::X86_64).unwrap_err().to_string();
        assert!(
            e.contains("configured but not built (no arch/x86/boot/bzImage)"),
            "{e}"
        );
        assert!(
            e.contains(&format!("make -C {} LLVM=-19 -j$(nproc)", build.display())),
            "{e}"
        );
        t.put("build/arch/x86/boot/bzImage", "");
        // The .config changed after the last build.
        std::thread::sleep(std::time::Duration::from_millis(20));
        t.put("build/.config", CONFIG);
        let e = open(Arch::X86_64).unwrap_err().to_string();
        assert!(e.contains("changed after the last build"), "{e}");
    }

    #[test]
    fn in_tree_builds_and_non_trees() {
        let t = Scratch::new("intree");
        t.put("linux/Kconfig", "");
        t.put("linux/Makefile", "");
        let frags = t.0.join("frags");
        t.put("frags/base.config", "CONFIG_DEVICE_PRIVATE=y\n");
        t.put("frags/x86_64.config", "");
        let e = Kernel::open(&t.0.join("linux"), Arch::X86_64, Flavour::Release, &frags)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not configured") && e.contains("allnoconfig"),
            "{e}"
        );
        let e = Kernel::open(&frags, Arch::X86_64, Flavour::Release, &frags)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a kernel tree"), "{e}");
        let (build, frags) = built_tree(&t, "linux");
        let k = Kernel::open(&build, Arch::X86_64, Flavour::Release, &frags).unwrap();
        assert!(k.in_tree());
    }

    #[test]
    fn arch_of_a_config() {
        let a = |s: &str| config_arch(&parse_config(s), Some("x"));
        assert_eq!(a("CONFIG_X86_64=y\n"), Ok(Arch::X86_64));
        assert_eq!(
            a("CONFIG_PPC64=y\nCONFIG_CPU_LITTLE_ENDIAN=y\n"),
            Ok(Arch::Ppc64le)
        );
        assert!(a("CONFIG_PPC64=y\n").is_err());
        assert!(a("CONFIG_ARM64=y\n").unwrap_err().contains("for x"));
        assert_eq!(
            config_srcarch("#\n# Automatically generated file; DO NOT EDIT.\n# Linux/powerpc 7.2.12 Kernel Configuration\n"),
            Some("powerpc".into())
        );
    }
}
