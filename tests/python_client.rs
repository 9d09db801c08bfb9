//! The Python client's suite (clients/python/tests, pytest with real PyTorch
//! on CPU) against this build's `gradguard serve`.
//!
//! It needs a Python with the client and its test extras installed; `.ci/run`
//! makes one in `clients/python/.venv`:
//!
//! ```sh
//! python3 -m venv clients/python/.venv
//! clients/python/.venv/bin/pip install torch -e 'clients/python[kafka,lightning,huggingface,test]'
//! ```
//!
//! `GRADGUARD_PYTHON` names another interpreter.

use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("GRADGUARD_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python/.venv/bin/python");
    assert!(
        venv.exists(),
        "the Python client's tests need {}: python3 -m venv clients/python/.venv && \
         clients/python/.venv/bin/pip install torch -e 'clients/python[kafka,lightning,huggingface,test]' \
         (.ci/run does), or set GRADGUARD_PYTHON",
        venv.display()
    );
    venv
}

#[test]
fn python_client_suite_passes_against_this_build() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python");
    let status = Command::new(python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(&dir)
        .env("GRADGUARD_BIN", env!("CARGO_BIN_EXE_gradguard"))
        .env("PYTHONUNBUFFERED", "1")
        .status()
        .expect("run pytest");
    assert!(
        status.success(),
        "the Python client's tests failed (output above): {status}"
    );
}
