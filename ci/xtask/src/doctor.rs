//! `cargo xtask doctor`: checks, changing nothing, what each command needs on
//! this host, with the versions found and the Debian package that provides
//! each; and the KVM probe that `--accel auto` also runs (kvm-ioctls: API
//! version, capabilities, a tiny guest that must reach its HLT in time).

use crate::build::Release;
use crate::cli::Arch;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but not as tested (another version) or only partly.
    Warn,
    /// Needed and not there.
    Missing,
    /// Not needed here (e.g. a build that HMMGPU_QEMU replaces).
    Skip,
}

impl Status {
    fn tag(self) -> &'static str {
        match self {
            Status::Ok => "[ ok ]",
            Status::Warn => "[warn]",
            Status::Missing => "[MISS]",
            Status::Skip => "[skip]",
        }
    }
}

struct Check {
    status: Status,
    what: String,
    /// What was found (a version, a path) or why not.
    found: String,
    /// The Debian package that provides it, and how to get it otherwise.
    fix: String,
}

struct Report {
    checks: Vec<Check>,
    has_dpkg: bool,
}

impl Report {
    fn section(&self, title: &str) {
        println!("\n== {title}");
    }

    fn add(
        &mut self,
        status: Status,
        what: impl Into<String>,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) {
        let c = Check {
            status,
            what: what.into(),
            found: found.into(),
            fix: fix.into(),
        };
        let fix = if c.fix.is_empty() || c.status == Status::Ok {
            String::new()
        } else {
            format!("\n         -> {}", c.fix)
        };
        println!("{} {:<40} {}{fix}", c.status.tag(), c.what, c.found);
        self.checks.push(c);
    }

    /// Where `package` comes from, with its installed version if dpkg
    /// knows it: `[Debian clang-19 1:19.1.7-3]`, `[rustup]`.
    fn provider(&self, package: &str) -> String {
        if let Some(how) = package.strip_prefix('(').and_then(|p| p.strip_suffix(')')) {
            return format!("[{how}]");
        }
        match self.deb_version(package) {
            Some(d) => format!("[Debian {package} {d}]"),
            None => format!("[Debian package: {package}]"),
        }
    }

    /// Installed version of a Debian package, if this host has dpkg.
    fn deb_version(&self, package: &str) -> Option<String> {
        if !self.has_dpkg {
            return None;
        }
        let o = Command::new("dpkg-query")
            .args(["-W", "-f=${Status} ${Version}", package])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let s = String::from_utf8_lossy(&o.stdout).to_string();
        s.strip_prefix("install ok installed ")
            .map(|v| v.trim().to_string())
    }

    /// A tool on PATH: its version (first line of `tool ARGS`) and package.
    fn tool(
        &mut self,
        tool: &str,
        args: &[&str],
        package: &str,
        needed_by: &str,
    ) -> Option<String> {
        let what = format!("{tool} ({needed_by})");
        match version_of(tool, args) {
            Some(v) => {
                let pkg = self.provider(package);
                self.add(Status::Ok, what, format!("{v}  {pkg}"), "");
                Some(v)
            }
            None => {
                let fix = self.install_hint(package);
                self.add(Status::Missing, what, "not found on PATH", fix);
                None
            }
        }
    }

    /// A file some package provides (a library, headers, a tarball).
    fn file(&mut self, path: &Path, what: &str, package: &str) -> bool {
        if path.exists() {
            let pkg = self.provider(package);
            self.add(Status::Ok, what, format!("{}  {pkg}", path.display()), "");
            true
        } else {
            let fix = self.install_hint(package);
            self.add(Status::Missing, what, format!("no {}", path.display()), fix);
            false
        }
    }

    fn install_hint(&self, package: &str) -> String {
        if self.has_dpkg {
            format!("apt-get install {package} (ci/setup-host.sh installs it)")
        } else {
            format!("install your distribution's equivalent of Debian's {package}")
        }
    }
}

/// The first line of `tool args...` (stdout, else stderr), trimmed; None if
/// it cannot run.
fn version_of(tool: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = if o.stdout.is_empty() {
        &o.stderr
    } else {
        &o.stdout
    };
    let line = String::from_utf8_lossy(text)
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    Some(if line.is_empty() {
        "(no version output)".into()
    } else {
        line
    })
}

/// The first `N.N[.N]` in `s`.
fn version_number(s: &str) -> Option<Vec<u32>> {
    s.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|w| w.contains('.'))
        .find_map(|w| {
            let v: Vec<u32> = w
                .split('.')
                .filter(|p| !p.is_empty())
                .map_while(|p| p.parse().ok())
                .collect();
            (v.len() >= 2).then_some(v)
        })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// The kernel builds' fixed paths (images/build-kernel.sh).
const RUST_LIB_SRC: &str = "/usr/lib/rustlib/src/rust/library";
const LIBCLANG: &str = "/usr/lib/llvm-19/lib/libclang.so";
/// The versions the kernel builds were tested with (ci/setup-host.sh).
const TESTED_BINDGEN: &str = "0.72.1";

pub fn run() -> anyhow::Result<i32> {
    let mut r = Report {
        checks: Vec::new(),
        has_dpkg: on_path("dpkg") && on_path("dpkg-query"),
    };
    println!(
        "cargo xtask doctor: what `cargo xtask run`, `test` and `bench` need on this host ({} {}); nothing is changed",
        std::env::consts::ARCH,
        std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string())))
            .unwrap_or_default()
    );

    r.section("host setup (ci/setup-host.sh installs the Debian packages below; --no-setup or HMMGPU_NO_SETUP=1 skips it)");
    if r.has_dpkg && on_path("apt-get") {
        r.add(
            Status::Ok,
            "dpkg, apt-get",
            "present: ci/setup-host.sh can install what is missing (it lists it and asks first)",
            "",
        );
    } else {
        r.add(
            Status::Warn,
            "dpkg, apt-get",
            "not on this host: ci/setup-host.sh cannot install anything",
            "install what is listed [MISS] below yourself, then run with --no-setup (or HMMGPU_NO_SETUP=1)",
        );
    }

    r.section("every VM run (run, test, bench)");
    r.tool("cargo", &["--version"], "(rustup)", "backend, xtask");
    r.tool("make", &["--version"], "make", "builds, kernel headers");
    r.tool(
        "gcc",
        &["--version"],
        "build-essential",
        "static guest programs",
    );
    r.file(
        &PathBuf::from(format!(
            "/usr/lib/{}-linux-gnu/libc.a",
            std::env::consts::ARCH
        )),
        "static libc (guest programs)",
        "libc6-dev",
    );
    busybox_check(&mut r);
    r.tool("cpio", &["--version"], "cpio", "initramfs");
    r.tool("gzip", &["--version"], "gzip", "initramfs");
    r.tool("readelf", &["--version"], "binutils", "initramfs");
    r.tool("rsync", &["--version"], "rsync", "hmmgpu.ko build");
    shm_check(&mut r);

    r.section("the guest kernel: Debian's linux-source built here (not needed with --kernel-dir for run/bench)");
    for t in ["flex", "bison", "bc"] {
        r.tool(t, &["--version"], t, "kernel build");
    }
    r.file(
        Path::new("/usr/include/gelf.h"),
        "libelf headers",
        "libelf-dev",
    );
    r.file(
        Path::new("/usr/include/openssl/ssl.h"),
        "OpenSSL headers",
        "libssl-dev",
    );
    r.tool("xz", &["--version"], "xz-utils", "linux-source tarballs");
    for (rel, pkg, what) in [
        (Release::V7_3, "linux-source-7.3", "every test's kernel"),
        (Release::V7_2, "linux-source-7.2", "test: own-kernel"),
    ] {
        let tarball = PathBuf::from(format!("/usr/src/linux-source-{}.tar.xz", rel.as_str()));
        r.file(&tarball, &format!("{pkg} ({what})"), pkg);
    }
    toolchain_checks(&mut r);

    r.section("QEMU with vhost-user-hmmgpu-pci (qemu-patches/build-qemu.sh builds it; HMMGPU_QEMU replaces it)");
    qemu_checks(&mut r);

    r.section("PowerPC (test: ppc64le guests, cross-test: the backend's tests under qemu-user)");
    r.tool(
        "powerpc64le-linux-gnu-gcc",
        &["--version"],
        "gcc-powerpc64le-linux-gnu",
        "ppc64le guest programs",
    );
    r.tool(
        "powerpc64-linux-gnu-gcc",
        &["--version"],
        "gcc-powerpc64-linux-gnu",
        "cross-test (big-endian)",
    );
    r.tool(
        "qemu-ppc64le",
        &["--version"],
        "qemu-user",
        "cross-test, ppc64le busybox",
    );
    r.tool(
        "qemu-ppc64",
        &["--version"],
        "qemu-user",
        "cross-test (big-endian)",
    );
    let cache = cache_dir();
    let bb = cache.join("busybox-ppc64le/bin/busybox");
    if bb.is_file() {
        r.add(
            Status::Ok,
            "busybox for ppc64le guests",
            bb.display().to_string(),
            "",
        );
    } else {
        r.add(
            Status::Missing,
            "busybox for ppc64le guests",
            format!("no {}", bb.display()),
            "ci/setup-host.sh unpacks Debian's busybox-static:ppc64el there",
        );
    }

    r.section("hugepages and memory");
    memory_checks(&mut r);

    r.section("KVM");
    let verdict = kvm_section(&mut r);

    let count = |s: Status| r.checks.iter().filter(|c| c.status == s).count();
    println!();
    println!("KVM verdict: {verdict}");
    println!(
        "{} ok, {} warnings, {} missing, {} not needed here",
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Missing),
        count(Status::Skip)
    );
    Ok(if count(Status::Missing) == 0 { 0 } else { 1 })
}

fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("HMMGPU_CACHE") {
        return PathBuf::from(c);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    base.join("hmmgpu")
}

fn busybox_check(r: &mut Report) {
    let bb = Path::new("/bin/busybox");
    let what = "static busybox (initramfs)";
    if !bb.is_file() {
        let fix = r.install_hint("busybox-static");
        r.add(Status::Missing, what, "no /bin/busybox", fix);
        return;
    }
    let dynamic = Command::new("readelf")
        .args(["-l", "/bin/busybox"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("Requesting program interpreter"))
        .unwrap_or(false);
    if dynamic {
        let fix = r.install_hint("busybox-static");
        r.add(
            Status::Missing,
            what,
            "/bin/busybox is dynamically linked",
            fix,
        );
    } else {
        let v = version_of("/bin/busybox", &["--help"]).unwrap_or_default();
        let pkg = r.provider("busybox-static");
        r.add(Status::Ok, what, format!("{v}  {pkg}"), "");
    }
}

fn shm_check(r: &mut Report) {
    // Two GPUs of 1 GiB (the tests' hmm-tests), fully used.
    const NEED: u64 = 2 << 30;
    let what = "/dev/shm (VRAM files)";
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let path = c"/dev/shm";
    // SAFETY: a valid C string and a statvfs to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        r.add(
            Status::Missing,
            what,
            "cannot stat /dev/shm",
            "mount a tmpfs on /dev/shm",
        );
        return;
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let size = st.f_blocks as u64 * st.f_frsize as u64;
    let writable = unsafe { libc::access(path.as_ptr(), libc::W_OK) } == 0;
    let found = format!(
        "{:.1} GiB free of {:.1} GiB{}; a run needs up to --vram per GPU (tests: 2 x 1 GiB)",
        free as f64 / (1u64 << 30) as f64,
        size as f64 / (1u64 << 30) as f64,
        if writable { "" } else { ", NOT writable" }
    );
    let status = if !writable {
        Status::Missing
    } else if free < NEED {
        Status::Warn
    } else {
        Status::Ok
    };
    r.add(
        status,
        what,
        found,
        "a larger tmpfs on /dev/shm (mount -o remount,size=4G /dev/shm)",
    );
}

fn toolchain_checks(r: &mut Report) {
    let rustc = r.tool("rustc", &["--version"], "(rustup)", "Rust for the kernel");
    let bindgen = r.tool(
        "bindgen",
        &["--version"],
        "(cargo install bindgen-cli)",
        "kernel bindings",
    );
    if let Some(b) = bindgen {
        if !b.contains(TESTED_BINDGEN) {
            r.add(
                Status::Warn,
                "bindgen version",
                format!("{b}; the kernel builds here were tested with {TESTED_BINDGEN}"),
                format!("cargo install --locked bindgen-cli --version {TESTED_BINDGEN}"),
            );
        }
    } else if let Some(c) = r.checks.last_mut() {
        c.fix = format!(
            "cargo install --locked bindgen-cli --version {TESTED_BINDGEN} (ci/setup-host.sh does)"
        );
    }
    r.file(
        Path::new(LIBCLANG),
        "libclang 19 (bindgen)",
        "libclang-19-dev",
    );
    // The kernel needs the library sources of exactly this rustc.
    let src = Path::new(RUST_LIB_SRC);
    let what = "rust-src (RUST_LIB_SRC)";
    match (src.join("core/src/lib.rs").is_file(), &rustc) {
        (false, _) => {
            let fix = r.install_hint("rust-src (trixie-backports, the version of rustc)");
            r.add(Status::Missing, what, format!("no {RUST_LIB_SRC}"), fix)
        }
        (true, Some(rv)) => {
            let deb = r.deb_version("rust-src");
            let rustc_v = version_number(rv);
            let src_v = deb.as_deref().and_then(version_number);
            let (status, note) = match (&rustc_v, &src_v) {
                (Some(a), Some(b)) if a == b => (Status::Ok, "matches rustc".to_string()),
                (Some(_), Some(_)) => (Status::Missing, format!("does not match {rv}")),
                _ => (
                    Status::Warn,
                    "version unknown: it must match rustc".to_string(),
                ),
            };
            r.add(
                status,
                what,
                format!(
                    "{RUST_LIB_SRC}: {} ({note})",
                    deb.unwrap_or_else(|| "not from a Debian package".into())
                ),
                "rust-src of the same version as rustc (ci/setup-host.sh pins it)",
            );
        }
        (true, None) => r.add(
            Status::Warn,
            what,
            format!("{RUST_LIB_SRC} (no rustc to compare)"),
            "",
        ),
    }
    for (t, pkg) in [
        ("clang-19", "clang-19"),
        ("ld.lld-19", "lld-19"),
        ("llvm-ar-19", "llvm-19"),
    ] {
        r.tool(t, &["--version"], pkg, "LLVM=-19: debug, ppc64le");
    }
}

fn qemu_checks(r: &mut Report) {
    for (var, arch) in [
        ("HMMGPU_QEMU", Arch::X86_64),
        ("HMMGPU_QEMU_PPC64", Arch::Ppc64le),
    ] {
        if let Some(q) = std::env::var_os(var) {
            let q = PathBuf::from(q);
            qemu_binary(r, &format!("{var} ({})", arch.as_str()), &q, true);
        }
    }
    let mut cached: Vec<PathBuf> = std::fs::read_dir(cache_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("qemu-")
                    && !n.to_string_lossy().starts_with("qemu-src")
            }) && p.join("done").is_file()
        })
        .collect();
    cached.sort();
    if cached.is_empty() {
        r.add(
            Status::Warn,
            "patched QEMU (cache)",
            "none built yet: the first run builds it (about 4 min on 2 cores)",
            "",
        );
    }
    for dir in &cached {
        for arch in [Arch::X86_64, Arch::Ppc64le] {
            qemu_binary(
                r,
                &format!("patched {}", arch.qemu_binary()),
                &dir.join("bin").join(arch.qemu_binary()),
                true,
            );
        }
    }
    if let Some(p) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    }) {
        qemu_binary(r, "qemu-system-x86_64 on PATH", &p, false);
    }
    // Building it: Debian's source via apt-get source, then meson/ninja.
    let deb_src = ["/etc/apt/sources.list", "/etc/apt/sources.list.d"]
        .iter()
        .flat_map(|p| {
            let p = Path::new(p);
            if p.is_dir() {
                std::fs::read_dir(p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .collect()
            } else {
                vec![p.to_path_buf()]
            }
        })
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .any(|t| {
            t.lines()
                .any(|l| l.trim_start().starts_with("deb-src") && l.contains(" trixie "))
                || (t.contains("Types:") && t.contains("deb-src") && t.contains("trixie"))
        });
    if deb_src {
        r.add(
            Status::Ok,
            "deb-src for trixie (QEMU source)",
            "configured",
            "",
        );
    } else {
        r.add(
            Status::Missing,
            "deb-src for trixie (QEMU source)",
            "not in /etc/apt: build-qemu.sh fetches qemu's source package with apt-get source",
            "ci/setup-host.sh adds it (or set HMMGPU_QEMU to a QEMU with the patches)",
        );
    }
    r.tool(
        "dpkg-source",
        &["--version"],
        "dpkg-dev",
        "QEMU source unpacking",
    );
    if let Some(v) = r.tool(
        "meson",
        &["--version"],
        "meson (bookworm-backports)",
        "QEMU build",
    ) {
        if version_number(&v).is_some_and(|n| n < vec![1, 5]) {
            r.add(
                Status::Missing,
                "meson version",
                format!("{v}: QEMU 10.0 wants 1.5 or newer"),
                "meson from bookworm-backports (ci/setup-host.sh)",
            );
        }
    }
    r.tool("ninja", &["--version"], "ninja-build", "QEMU build");
    r.tool("pkg-config", &["--version"], "pkg-config", "QEMU build");
    // Debian's libfdt-dev has no pkg-config file; QEMU finds the library.
    r.file(
        Path::new("/usr/include/libfdt.h"),
        "libfdt headers (QEMU build)",
        "libfdt-dev",
    );
    for (module, pkg) in [
        ("glib-2.0", "libglib2.0-dev"),
        ("pixman-1", "libpixman-1-dev"),
        ("zlib", "zlib1g-dev"),
    ] {
        let ok = Command::new("pkg-config")
            .args(["--modversion", module])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        match ok {
            Some(v) => {
                let p = r.provider(pkg);
                r.add(
                    Status::Ok,
                    format!("{module} (QEMU build)"),
                    format!("{v}  {p}"),
                    "",
                )
            }
            None => {
                let fix = r.install_hint(pkg);
                r.add(
                    Status::Missing,
                    format!("{module} (QEMU build)"),
                    "pkg-config does not know it",
                    fix,
                )
            }
        }
    }
    let venv = Command::new("/usr/bin/python3")
        .args(["-c", "import venv, ensurepip"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if venv {
        r.add(
            Status::Ok,
            "/usr/bin/python3 venv (QEMU)",
            version_of("/usr/bin/python3", &["--version"]).unwrap_or_default(),
            "",
        );
    } else {
        let fix = r.install_hint("python3-venv");
        r.add(
            Status::Missing,
            "/usr/bin/python3 venv (QEMU)",
            "no venv/ensurepip module",
            fix,
        );
    }
}

/// Whether `bin` has the hmmgpu front end (`-device help`).
fn qemu_binary(r: &mut Report, what: &str, bin: &Path, want_patched: bool) {
    let Ok(o) = Command::new(bin)
        .args(["-device", "help"])
        .stdin(Stdio::null())
        .output()
    else {
        r.add(
            Status::Missing,
            what,
            format!("{} does not run", bin.display()),
            "",
        );
        return;
    };
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    let version = version_of(&bin.display().to_string(), &["--version"]).unwrap_or_default();
    let patched = text.contains("\"vhost-user-hmmgpu-pci\"");
    let found = format!(
        "{}: {version}, {}",
        bin.display(),
        if patched {
            "patched (has vhost-user-hmmgpu-pci)"
        } else {
            "stock (no vhost-user-hmmgpu-pci)"
        }
    );
    let status = match (patched, want_patched) {
        (true, _) => Status::Ok,
        (false, true) => Status::Missing,
        (false, false) => Status::Skip,
    };
    r.add(
        status,
        what,
        found,
        "qemu-patches/build-qemu.sh builds a patched one (cargo xtask run does it)",
    );
}

fn meminfo(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
}

fn memory_checks(r: &mut Report) {
    let total = meminfo("HugePages_Total").unwrap_or(0);
    let free = meminfo("HugePages_Free").unwrap_or(0);
    let size_kb = meminfo("Hugepagesize").unwrap_or(0);
    r.add(
        Status::Ok,
        "host hugetlb pages",
        format!(
            "{total} of {} KiB ({free} free): not needed (guest RAM and VRAM are shared memfd/tmpfs; the guest reserves its own)",
            size_kb
        ),
        "",
    );
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    r.add(
        Status::Ok,
        "host transparent hugepages",
        format!(
            "enabled: {}, shmem: {} (either way)",
            thp.trim(),
            shmem.trim()
        ),
        "",
    );
    let avail = meminfo("MemAvailable").unwrap_or(0) << 10;
    // --memory 2G plus two 1 GiB GPUs, all in use.
    let need: u64 = 4 << 30;
    r.add(
        if avail >= need {
            Status::Ok
        } else {
            Status::Warn
        },
        "available memory",
        format!(
            "{:.1} GiB; a test VM uses up to 4 GiB (2 GiB guest RAM, 2 x 1 GiB VRAM)",
            avail as f64 / (1u64 << 30) as f64
        ),
        "fewer runs at once, or a smaller --memory/--vram",
    );
}

/// The KVM section; returns the verdict line.
fn kvm_section(r: &mut Report) -> String {
    let virt = cpu_has_virt_flag();
    r.add(
        if virt { Status::Ok } else { Status::Warn },
        "CPU virtualization flag",
        if virt {
            "vmx/svm in /proc/cpuinfo".to_string()
        } else {
            "no vmx/svm in /proc/cpuinfo (a nested or paravirtual KVM at best)".to_string()
        },
        "",
    );
    let report = kvm::probe();
    for line in &report.lines {
        r.add(line.0, line.1.clone(), line.2.clone(), "");
    }
    match accel_verdict(&report, virt) {
        Ok(why) => format!("--accel auto uses KVM: {why}"),
        Err(why) => format!("--accel auto uses TCG: {why}"),
    }
}

pub fn cpu_has_virt_flag() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        // PowerPC hosts have no such flag: KVM-HV or KVM-PR works if /dev/kvm does.
        || !cfg!(target_arch = "x86_64")
}

/// Whether `--accel auto` takes KVM, and why (Err: why not).
fn accel_verdict(p: &kvm::Probe, virt_flag: bool) -> Result<String, String> {
    p.usable()?;
    if !virt_flag {
        return Err(format!(
            "{}, but /proc/cpuinfo has no vmx/svm flag: a nested or paravirtual KVM, which runs a tiny guest yet hangs real kernels; --accel kvm forces it",
            p.summary()
        ));
    }
    Ok(p.summary())
}

/// For `--accel auto` (vm.rs, which checks vmx/svm itself: on a paravirtual
/// KVM the tiny guest runs, yet real kernels hang): Ok(what works) if the
/// probe passes, Err(why not).
pub fn kvm_for_auto() -> Result<String, String> {
    let p = kvm::probe();
    p.usable().map(|()| p.summary())
}

/// The KVM probe. On x86_64 hosts it runs `xtask kvm-probe` (a child, so a
/// guest that never comes back can be killed at the deadline); the child
/// uses kvm-ioctls, which does not build for PowerPC.
pub mod kvm {
    use super::Status;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// How long the tiny guest may take from KVM_RUN to HLT, plus the
    /// child's start: far more than it needs anywhere KVM works.
    pub const DEADLINE: Duration = Duration::from_secs(5);

    /// The capabilities QEMU's vhost-user devices need from KVM: guest memory
    /// from user space, and eventfds for notifications both ways.
    pub const CAPS: [&str; 3] = ["user_memory", "irqfd", "ioeventfd"];

    #[derive(Debug, Default)]
    pub struct Probe {
        /// (status, check, result) lines for the doctor.
        pub lines: Vec<(Status, String, String)>,
        pub api: Option<i32>,
        pub caps: Vec<(String, bool)>,
        /// How long the guest took to HLT, or why it did not.
        pub guest: Option<Result<Duration, String>>,
        /// Why the probe could not run at all.
        pub error: Option<String>,
        /// Why there is no probe on this host (not an x86_64 host).
        pub unprobed: Option<String>,
    }

    impl Probe {
        pub fn usable(&self) -> Result<(), String> {
            if self.unprobed.is_some() {
                return Ok(());
            }
            if let Some(e) = &self.error {
                return Err(e.clone());
            }
            match self.api {
                Some(12) => {}
                Some(v) => return Err(format!("KVM API version {v}, not 12")),
                None => return Err("the probe reported no KVM API version".into()),
            }
            let missing: Vec<&str> = self
                .caps
                .iter()
                .filter(|(_, ok)| !ok)
                .map(|(c, _)| c.as_str())
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "/dev/kvm lacks capabilities QEMU needs: {}",
                    missing.join(", ")
                ));
            }
            match &self.guest {
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(format!(
                    "/dev/kvm opens, but the probe guest did not run: {e}"
                )),
                None => Err("the probe guest did not report".into()),
            }
        }

        pub fn summary(&self) -> String {
            if let Some(why) = &self.unprobed {
                return format!("/dev/kvm opens read-write ({why})");
            }
            match &self.guest {
                Some(Ok(d)) => format!(
                    "/dev/kvm works (API {}, {}; a tiny guest ran to HLT in {:.2} ms)",
                    self.api.unwrap_or(0),
                    CAPS.join(", "),
                    d.as_secs_f64() * 1e3
                ),
                _ => "/dev/kvm".into(),
            }
        }

        /// Parses the child's lines: `api N`, `cap NAME 0|1`, `guest hlt US`,
        /// `guest error MSG`, `error MSG`.
        pub fn parse(out: &str) -> Probe {
            let mut p = Probe::default();
            for l in out.lines() {
                let mut w = l.splitn(3, ' ');
                match (w.next(), w.next(), w.next()) {
                    (Some("api"), Some(v), None) => p.api = v.parse().ok(),
                    (Some("cap"), Some(c), Some(v)) => p.caps.push((c.to_string(), v == "1")),
                    (Some("guest"), Some("hlt"), Some(us)) => {
                        p.guest = Some(
                            us.parse()
                                .map(Duration::from_micros)
                                .map_err(|_| format!("bad line {l}")),
                        )
                    }
                    (Some("guest"), Some("error"), Some(m)) => p.guest = Some(Err(m.to_string())),
                    (Some("error"), Some(a), b) => {
                        p.error = Some(format!(
                            "{a}{}",
                            b.map(|b| format!(" {b}")).unwrap_or_default()
                        ))
                    }
                    _ => {}
                }
            }
            p.lines = p.doctor_lines();
            p
        }

        fn doctor_lines(&self) -> Vec<(Status, String, String)> {
            let mut v = Vec::new();
            if let Some(why) = &self.unprobed {
                v.push((Status::Skip, "KVM probe".to_string(), why.clone()));
                return v;
            }
            if let Some(e) = &self.error {
                v.push((Status::Warn, "/dev/kvm".to_string(), e.clone()));
                return v;
            }
            v.push((
                if self.api == Some(12) {
                    Status::Ok
                } else {
                    Status::Warn
                },
                "KVM API version".to_string(),
                self.api.map_or("none reported".into(), |a| a.to_string()),
            ));
            for (c, ok) in &self.caps {
                v.push((
                    if *ok { Status::Ok } else { Status::Warn },
                    format!("KVM_CAP_{}", c.to_uppercase()),
                    if *ok { "yes".into() } else { "no".into() },
                ));
            }
            v.push(match &self.guest {
                Some(Ok(d)) => (
                    Status::Ok,
                    "probe guest (real mode, OUT, HLT)".to_string(),
                    format!("ran to HLT in {:.2} ms", d.as_secs_f64() * 1e3),
                ),
                Some(Err(e)) => (Status::Warn, "probe guest".to_string(), e.clone()),
                None => (Status::Warn, "probe guest".to_string(), "no report".into()),
            });
            v
        }
    }

    /// Runs the probe child with [`DEADLINE`].
    pub fn probe() -> Probe {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return Probe::parse(&format!("error /dev/kvm does not open read-write: {e}"));
        }
        if !cfg!(target_arch = "x86_64") {
            let mut p = Probe {
                unprobed: Some(
                    "no probe on this host: kvm-ioctls builds for x86_64 only".to_string(),
                ),
                ..Probe::default()
            };
            p.lines = p.doctor_lines();
            return p;
        }
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => return Probe::parse(&format!("error cannot find xtask's own binary: {e}")),
        };
        let mut child = match Command::new(exe)
            .arg("kvm-probe")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => return Probe::parse(&format!("error cannot start the probe: {e}")),
        };
        let start = Instant::now();
        let mut late = None;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if start.elapsed() < DEADLINE => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    late = Some(format!(
                        "guest error it did not reach HLT within {} s (killed)",
                        DEADLINE.as_secs()
                    ));
                    break;
                }
            }
        }
        // What the child printed (before it was killed: its api and cap
        // lines come first, each flushed at its newline).
        let mut out = String::new();
        if let Some(mut so) = child.stdout.take() {
            use std::io::Read;
            let _ = so.read_to_string(&mut out);
        }
        if let Some(l) = late {
            out = format!("{out}\n{l}\n");
        }
        Probe::parse(&out)
    }

    use std::os::unix::process::CommandExt as _;

    /// `xtask kvm-probe`: prints the probe's lines; exit 0.
    pub fn child() -> i32 {
        #[cfg(target_arch = "x86_64")]
        {
            imp::run();
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            println!("error the KVM probe is compiled for x86_64 hosts only");
        }
        0
    }

    #[cfg(target_arch = "x86_64")]
    mod imp {
        use super::CAPS;
        use kvm_bindings::kvm_userspace_memory_region;
        use kvm_ioctls::{Cap, Kvm, VcpuExit};
        use std::time::Instant;

        /// Where the guest's one page is.
        const GUEST_ADDR: u64 = 0x1000;
        /// The port the guest writes its byte to, and the byte.
        const PORT: u16 = 0x3f8;
        const BYTE: u8 = 0x42;
        /// Real mode: mov dx, 0x3f8; mov al, 0x42; out dx, al; hlt.
        const CODE: [u8; 7] = [0xba, 0xf8, 0x03, 0xb0, BYTE, 0xee, 0xf4];

        pub fn run() {
            let kvm = match Kvm::new() {
                Ok(k) => k,
                Err(e) => return println!("error /dev/kvm: {e}"),
            };
            println!("api {}", kvm.get_api_version());
            for (name, cap) in CAPS
                .iter()
                .zip([Cap::UserMemory, Cap::Irqfd, Cap::Ioeventfd])
            {
                println!("cap {name} {}", u8::from(kvm.check_extension(cap)));
            }
            match guest(&kvm) {
                Ok(us) => println!("guest hlt {us}"),
                Err(e) => println!("guest error {e}"),
            }
        }

        /// Runs the tiny guest; returns the microseconds to its HLT.
        fn guest(kvm: &Kvm) -> Result<u128, String> {
            let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
            let size = 0x1000usize;
            // SAFETY: a fresh anonymous mapping, checked below, never freed
            // (the probe process exits right after).
            let mem = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if mem == libc::MAP_FAILED {
                return Err(format!("mmap: {}", std::io::Error::last_os_error()));
            }
            // SAFETY: the mapping is `size` bytes, CODE is shorter.
            unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), mem.cast::<u8>(), CODE.len()) };
            let region = kvm_userspace_memory_region {
                slot: 0,
                guest_phys_addr: GUEST_ADDR,
                memory_size: size as u64,
                userspace_addr: mem as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping of this process that
            // outlives the VM.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
            let mut vcpu = vm
                .create_vcpu(0)
                .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
            let mut sregs = vcpu
                .get_sregs()
                .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            vcpu.set_sregs(&sregs)
                .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
            let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
            regs.rip = GUEST_ADDR;
            regs.rflags = 2;
            vcpu.set_regs(&regs)
                .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
            let start = Instant::now();
            let mut wrote = false;
            loop {
                match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
                    VcpuExit::IoOut(port, data) if port == PORT && data == [BYTE] => wrote = true,
                    VcpuExit::Hlt if wrote => return Ok(start.elapsed().as_micros()),
                    VcpuExit::Hlt => return Err("HLT before the guest's OUT".into()),
                    other => return Err(format!("unexpected exit {other:?}")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            version_number("rustc 1.95.0 (abc 2025-01-01)"),
            Some(vec![1, 95, 0])
        );
        assert_eq!(
            version_number("1.95.0+dfsg1-2~bpo13+1"),
            Some(vec![1, 95, 0])
        );
        assert_eq!(version_number("meson 1.7.0"), Some(vec![1, 7, 0]));
        assert_eq!(version_number("none"), None);
    }

    #[test]
    fn kvm_probe_lines_and_verdicts() {
        let good = "api 12\ncap user_memory 1\ncap irqfd 1\ncap ioeventfd 1\nguest hlt 420\n";
        let p = kvm::Probe::parse(good);
        assert_eq!(p.usable(), Ok(()));
        assert!(accel_verdict(&p, true).is_ok());
        // This machine: the guest runs, but there is no vmx/svm.
        let v = accel_verdict(&p, false).unwrap_err();
        assert!(v.contains("no vmx/svm"), "{v}");
        // A capability missing, a guest that does not run, no /dev/kvm.
        let p = kvm::Probe::parse(&good.replace("irqfd 1", "irqfd 0"));
        assert!(p.usable().unwrap_err().contains("irqfd"));
        let p = kvm::Probe::parse(&good.replace("guest hlt 420", "guest error KVM_RUN: EFAULT"));
        assert!(p.usable().unwrap_err().contains("did not run"));
        let p = kvm::Probe::parse("error /dev/kvm does not open read-write: ENOENT");
        assert!(p.usable().unwrap_err().contains("does not open"));
        let p = kvm::Probe::parse(&good.replace("api 12", "api 11"));
        assert!(p.usable().is_err());
    }
}
