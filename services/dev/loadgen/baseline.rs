//! `--baseline`: the decode-only sink (`gradguard sink`), spawned from this
//! executable.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

/// The sink, spawned from this very executable; killed and reaped when dropped,
/// on error paths too.
pub(super) struct SinkChild {
    pub(super) child: Child,
    pub(super) url: String,
}

impl SinkChild {
    /// Starts the sink and waits for its `listening grpc=` line: it is printed once
    /// the socket accepts connections, so there is nothing to sleep for.
    pub(super) fn spawn() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable to start the sink")?;
        let child = Command::new(&exe)
            .args(["sink", "--grpc-addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start the sink ({})", exe.display()))?;
        let mut sink = SinkChild {
            child,
            url: String::new(),
        };
        let stdout = sink.child.stdout.take().context("the sink has no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("cannot read the sink's listening line")?;
        let addr = line
            .trim()
            .strip_prefix("listening grpc=")
            .and_then(|rest| rest.split_whitespace().next())
            .with_context(|| format!("the sink did not announce its address (it printed {line:?})"))?;
        sink.url = format!("http://{addr}");
        Ok(sink)
    }
}

impl Drop for SinkChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
