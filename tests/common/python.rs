//! The Python the tests run: llama.cpp's own GGUF reader and writer (`gguf`, `numpy`) check the
//! files lethe writes, and the OpenAI SDK (`openai`) talks to `lethe serve`.
//!
//! `LETHE_PYTHON` names an interpreter that has these packages. Without it the tests make their
//! own virtual environment, `${XDG_CACHE_HOME:-~/.cache}/lethe/venv`, on first use: `python3 -m
//! venv`, then `pip install` from PyPI. Test binaries run in parallel processes and their tests
//! in threads, so the work is done once: a `OnceLock` within a process and an exclusive lock on
//! `venv.lock` between processes. A marker file, written only after the packages imported, says
//! the environment is complete; without it (an interrupted install, a venv without pip) the
//! environment is repaired.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The PyPI packages the tests import.
const PACKAGES: &[&str] = &["gguf", "numpy", "openai"];

/// Written into the environment once every package of [`PACKAGES`] imports.
const MARKER: &str = "lethe-test-packages";

/// The interpreter for the tests that use Python packages (see the module's documentation).
/// Panics, saying what to do, when there is none and none can be made.
pub fn python() -> String {
    static PYTHON: OnceLock<Result<String, String>> = OnceLock::new();
    match PYTHON.get_or_init(find_python) {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn find_python() -> Result<String, String> {
    if let Some(p) = std::env::var_os("LETHE_PYTHON").filter(|p| !p.is_empty()) {
        return Ok(p.to_string_lossy().into_owned());
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })
        .ok_or("neither LETHE_PYTHON, XDG_CACHE_HOME nor HOME is set: no place for the tests' Python environment")?;
    let venv = cache.join("lethe/venv");
    ensure_venv(&venv)?;
    Ok(venv_python(&venv).to_string_lossy().into_owned())
}

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts/python.exe")
    } else {
        venv.join("bin/python")
    }
}

/// Whether `venv` is complete: its marker names every package and each can be found.
fn is_ready(venv: &Path) -> bool {
    let py = venv_python(venv);
    let marker = fs::read_to_string(venv.join(MARKER)).unwrap_or_default();
    if !py.is_file() || marker.trim() != PACKAGES.join(" ") {
        return false;
    }
    let find = format!(
        "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in {PACKAGES:?}) else 1)"
    );
    run(Command::new(&py).args(["-c", &find])).is_ok_and(|o| o.status.success())
}

/// Makes `venv` complete, once, under an exclusive lock held against other processes.
fn ensure_venv(venv: &Path) -> Result<(), String> {
    if is_ready(venv) {
        return Ok(());
    }
    let dir = venv.parent().expect("the venv has a parent");
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let lock_path = dir.join("venv.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
    File::lock(&lock).map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
    // Another process may have made it while this one waited.
    if is_ready(venv) {
        return Ok(());
    }
    let py = venv_python(venv);
    let has_pip =
        run(Command::new(&py).args(["-m", "pip", "--version"])).is_ok_and(|o| o.status.success());
    if !has_pip {
        if venv.exists() {
            fs::remove_dir_all(venv).map_err(|e| {
                format!(
                    "removing the incomplete environment {}: {e}",
                    venv.display()
                )
            })?;
        }
        make_venv(venv)?;
    }
    let install = run(Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PACKAGES))
    .map_err(|e| format!("running {} -m pip: {e}", py.display()))?;
    if !install.status.success() {
        return Err(format!(
            "`pip install {}` into {} failed ({}); the tests need these PyPI packages (or \
             LETHE_PYTHON naming a Python that has them):\n{}",
            PACKAGES.join(" "),
            venv.display(),
            install.status,
            String::from_utf8_lossy(&install.stderr)
        ));
    }
    let import = format!("import {}", PACKAGES.join(", "));
    let check = run(Command::new(&py).args(["-c", &import]))
        .map_err(|e| format!("running {}: {e}", py.display()))?;
    if !check.status.success() {
        return Err(format!(
            "{} cannot `{import}` after installing them:\n{}",
            py.display(),
            String::from_utf8_lossy(&check.stderr)
        ));
    }
    let marker = venv.join(MARKER);
    fs::write(&marker, format!("{}\n", PACKAGES.join(" ")))
        .map_err(|e| format!("writing {}: {e}", marker.display()))?;
    Ok(())
}

/// `python3 -m venv VENV` (with pip).
fn make_venv(venv: &Path) -> Result<(), String> {
    let system = if cfg!(windows) { "python" } else { "python3" };
    let out = run(Command::new(system).arg("-m").arg("venv").arg(venv)).map_err(|e| {
        format!(
            "cannot run {system}: {e}; the tests need Python 3 to check lethe's files with \
             llama.cpp's reader and its server with the OpenAI SDK: install python3 (with its \
             venv module), or set LETHE_PYTHON to a Python that has {}",
            PACKAGES.join(", ")
        )
    })?;
    if out.status.success() && venv_python(venv).is_file() {
        return Ok(());
    }
    let _ = fs::remove_dir_all(venv);
    Err(format!(
        "`{system} -m venv {}` failed ({}): the tests make a virtual environment for {}; on \
         Debian and Ubuntu the venv module is the package python3-venv (apt install \
         python3-venv); or set LETHE_PYTHON to a Python that has them:\n{}",
        venv.display(),
        out.status,
        PACKAGES.join(", "),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Runs a command with no input, its output collected.
fn run(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null()).output()
}

/// Reads `path` with llama.cpp's Python reader (`tests/fixtures/gguf_dump.py`, JSON out).
/// Fails (never skips) when it is not installed.
pub fn python_dump(path: &Path) -> serde_json::Value {
    let py = python();
    let script = super::fixture("gguf_dump.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!("{stderr}\n{}", missing("llama.cpp's reader", &py));
    }
    assert!(
        out.status.success(),
        "gguf_dump.py failed on {}: {stderr}",
        path.display()
    );
    serde_json::from_slice(&out.stdout).expect("gguf_dump.py prints JSON")
}

/// What to do when `py`, the tests' Python, lacks a package (`what` names it).
pub fn missing(what: &str, py: &str) -> String {
    if std::env::var_os("LETHE_PYTHON").is_some_and(|p| !p.is_empty()) {
        format!(
            "LETHE_PYTHON={py} lacks {what}: install {} there, or unset LETHE_PYTHON and the \
             tests make their own environment",
            PACKAGES.join(" ")
        )
    } else {
        format!("{py} lacks {what}: remove its virtual environment and the tests make it again")
    }
}
