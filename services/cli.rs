//! Command-line arguments, and how failures map to exit codes.
//!
//! Exit codes: 0 success; 1 the input was bad (a trace file that could not be
//! read, or `--strict` with skipped lines); 2 the command was wrong (usage, the
//! rules file, an input file that does not exist). Clap's own usage errors also
//! exit 2.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use gradguard::model::Severity;
use gradguard::trace::Format;

#[derive(Debug, Parser)]
#[command(
    name = "gradguard",
    version,
    about = "Gradient anomaly detection and remediation advice"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: gRPC ingest with advice streamed back, Prometheus metrics.
    Serve(crate::serve::ServeArgs),
    /// Replay recorded training logs through the detector and report what it finds.
    Replay(ReplayArgs),
    /// Tail a training log as it is written and stream it to a running server,
    /// as the job's workers would; print the advice it gets.
    Follow(crate::follow::FollowArgs),
    /// Write a synthetic training run with an injected fault as JSON lines.
    Generate(crate::dev::generate::GenerateArgs),
    /// Print the effective rules (defaults, or a job's with its overrides) as TOML.
    Rules(RulesArgs),
    /// Play a synthetic training job against a running server and show its advice.
    Simulate(crate::dev::simulate::SimulateArgs),
    /// Load a gradguard server with concurrent worker streams and report its
    /// throughput, advice latency and memory.
    Loadgen(crate::dev::loadgen::LoadgenArgs),
    /// A decode-only Ingest server, the baseline `loadgen --baseline` compares to.
    #[command(hide = true)]
    Sink(crate::dev::sink::SinkArgs),
    /// List the jobs a running server knows: health, ranks, anomaly and advice counts.
    Jobs(crate::query_cli::JobsArgs),
    /// Show one job of a running server, with its latest anomalies and advice.
    Job(crate::query_cli::JobArgs),
    /// List a running server's stored anomalies, newest first.
    Anomalies(crate::query_cli::ListArgs),
    /// List a running server's stored advice, newest first, with its acknowledgements.
    Advice(crate::query_cli::ListArgs),
    /// Print anomalies as a running server stores them, until Ctrl-C.
    Watch(crate::query_cli::WatchArgs),
    /// Helpers for `serve --auth` files.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Print a shell completion script, e.g. `gradguard completions bash >
    /// /etc/bash_completion.d/gradguard` (or `source <(gradguard completions bash)`).
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `gradguard completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<ExitCode, Failure> {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "gradguard", &mut io::stdout());
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Print the `token_sha256` of a bearer token read from stdin (one line;
    /// the token never goes on a command line).
    HashToken,
    /// Check an auth file as `serve --auth` would, and list its principals.
    Check {
        /// The auth file (TOML).
        file: PathBuf,
    },
}

/// `gradguard auth ...`.
pub fn auth(command: &AuthCommand) -> Result<ExitCode, Failure> {
    match command {
        AuthCommand::HashToken => {
            let mut token = String::new();
            io::stdin()
                .read_line(&mut token)
                .map_err(|e| Failure::input(anyhow::anyhow!("cannot read the token from stdin: {e}")))?;
            let token = token.trim();
            if token.is_empty() {
                return Err(Failure::usage(anyhow::anyhow!("no token on stdin")));
            }
            println!("{}", gradguard::auth::sha256_hex(token));
        }
        AuthCommand::Check { file } => {
            let principals = gradguard::auth::Principals::load(file).map_err(Failure::usage)?;
            for name in principals.names() {
                println!("{name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The server a client command talks to when neither `--server` nor
/// `GRADGUARD_SERVER` says: a `gradguard serve` on this machine.
pub const DEFAULT_SERVER: &str = "http://localhost:50051";

/// How a client command proves itself to the server and checks it: TLS
/// and a bearer token (every command that calls a server has these).
#[derive(Debug, Clone, Default, Args)]
pub struct ClientSecurityArgs {
    /// PEM CA certificates that sign the server's certificate (TLS; the
    /// system's roots when absent with an `https://` server).
    #[arg(long, value_name = "FILE", env = "GRADGUARD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// A PEM client certificate, for servers that ask for one (mutual TLS; with `--tls-key`).
    #[arg(long, value_name = "FILE", env = "GRADGUARD_TLS_CLIENT_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of `--tls-cert`.
    #[arg(long, value_name = "FILE", env = "GRADGUARD_TLS_CLIENT_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// The bearer token (prefer the environment variable or `--token-file`:
    /// a flag shows in the process list).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "GRADGUARD_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,

    /// A file holding the bearer token.
    #[arg(long, value_name = "FILE", env = "GRADGUARD_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl ClientSecurityArgs {
    /// The client's security settings; an unreadable token file is a usage error.
    pub fn security(&self) -> Result<gradguard::client::ClientSecurity, Failure> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| Failure::usage(anyhow::anyhow!("--token-file {}: {e}", path.display())))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        if token.as_deref() == Some("") {
            return Err(Failure::usage(anyhow::anyhow!(
                "the token (--token, --token-file) is empty"
            )));
        }
        Ok(gradguard::client::ClientSecurity {
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            token,
        })
    }
}

#[derive(Debug, Args)]
pub struct RulesArgs {
    /// Rules file (TOML); the built-in defaults when absent.
    #[arg(long, value_name = "FILE", env = "GRADGUARD_RULES")]
    pub rules: Option<PathBuf>,

    /// Show this job's rules, with its `[jobs]` override applied.
    #[arg(long)]
    pub job: Option<String>,

    /// Apply this `[profiles]` entry.
    #[arg(long)]
    pub profile: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Trace files, replayed in order through one engine; `-` reads standard
    /// input. A directory is a TensorBoard log directory: every
    /// `events.out.tfevents.*` file under it, one job per directory holding
    /// them (named by its path in the directory given).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Log format of every FILE; `auto` detects it per file.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    pub format: FormatArg,

    /// jsonl, tensorboard, csv: read FIELD (step, loss, grad_norm, lr,
    /// loss_scale, time) from KEY (a key, a tag, a column), before any other
    /// spelling, e.g. `--field loss=train/loss_step`. Repeatable.
    #[arg(long, value_name = "FIELD=KEY")]
    pub field: Vec<String>,

    /// Rules file (TOML); the built-in defaults when absent.
    #[arg(long, value_name = "FILE", env = "GRADGUARD_RULES")]
    pub rules: Option<PathBuf>,

    /// Write one JSON object per line (anomalies, advice, then a summary).
    #[arg(long)]
    pub json: bool,

    /// With --json, also write each record read, as the engine gets it:
    /// `{"kind":"record","job","worker","step","time","loss","grad_norm","lr","loss_scale","line"}`,
    /// before what the engine made of it.
    #[arg(long, requires = "json")]
    pub records: bool,

    /// Exit with status 1 when any line was skipped.
    #[arg(long)]
    pub strict: bool,

    /// Print only anomalies and advice of at least this severity (info, warning,
    /// critical); the summary still counts everything.
    #[arg(
        long = "severity",
        alias = "min-severity",
        value_name = "SEVERITY",
        default_value = "info"
    )]
    pub min_severity: Severity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Detect it from the file name and first lines.
    Auto,
    /// One JSON object per line: gradguard's trace schema (step, loss, grad_norm, lr, loss_scale, time, job, worker, layers), also read under exporters' names (global_step, iteration, train/loss, lm_loss, gradient_norm, learning_rate, timestamp, ...); other keys are ignored and named once per file.
    Jsonl,
    /// A Hugging Face `trainer_state.json`.
    Hf,
    /// An llm.c `main.log`, or the standard output of llm.c's training program.
    Llmc,
    /// Megatron-LM or NeMo standard output: `iteration N/ T | ... | lm loss: ... | grad norm: ... |` lines.
    Megatron,
    /// TensorBoard event files (`events.out.tfevents.*`): scalars whose tags name fields as jsonl's keys do (loss, train/loss, train_loss, Loss/train, grad_norm, train/grad_norm, lr, learning_rate, lr-Adam, ...), one record per step; other tags are ignored and named once per file.
    Tensorboard,
    /// CSV with a header: a wide table (Lightning's metrics.csv, W&B exports; a step column and columns named as jsonl's keys, `RUN - KEY` as KEY for job RUN) or a long one (`key,value,step[,timestamp]`, MLflow's metric history).
    Csv,
}

impl FormatArg {
    /// The forced format, or `None` to detect it.
    pub fn format(self) -> Option<Format> {
        match self {
            FormatArg::Auto => None,
            FormatArg::Jsonl => Some(Format::Jsonl),
            FormatArg::Hf => Some(Format::Hf),
            FormatArg::Llmc => Some(Format::Llmc),
            FormatArg::Megatron => Some(Format::Megatron),
            FormatArg::Tensorboard => Some(Format::Tensorboard),
            FormatArg::Csv => Some(Format::Csv),
        }
    }
}

/// A command that could not do its job: the message for stderr and the status.
#[derive(Debug)]
pub struct Failure {
    pub error: anyhow::Error,
    pub code: u8,
}

impl Failure {
    /// The command itself is wrong (exit 2).
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self {
            error: error.into(),
            code: 2,
        }
    }

    /// The input is bad (exit 1).
    pub fn input(error: impl Into<anyhow::Error>) -> Self {
        Self {
            error: error.into(),
            code: 1,
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }
}

/// The message for stderr: the error and its causes, leaving out a cause that
/// an error already quotes in its own message.
pub fn describe(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}

/// A gRPC status for a message: its code and its message.
pub fn status_text(status: &tonic::Status) -> String {
    gradguard::client::status_message(status)
}

/// The rules file of a command that still takes `--config`, the old name of
/// `--rules` (`serve`, `simulate`): `--config` is used with a note on stderr.
/// `rules_on_command_line`: whether `--rules` was given as a flag, not only by
/// its environment variable (which a `--config` flag overrides, as any flag
/// overrides an environment variable).
pub fn rules_file(
    rules: Option<&Path>,
    config: Option<&Path>,
    rules_on_command_line: bool,
) -> Result<Option<PathBuf>, Failure> {
    match (rules, config) {
        (_, None) => Ok(rules.map(Path::to_owned)),
        (Some(_), Some(_)) if rules_on_command_line => Err(Failure::usage(anyhow::anyhow!(
            "--config is the old name of --rules: give only --rules"
        ))),
        (_, Some(config)) => {
            warn(&format!(
                "gradguard: warning: --config is deprecated and will be removed: use --rules {}",
                config.display()
            ));
            Ok(Some(config.to_owned()))
        }
    }
}

/// The note for a rules file that still holds the service's `[kafka]` section.
pub fn kafka_in_rules_note(rules: &Path) -> String {
    format!(
        "gradguard: warning: the [kafka] section of the rules file {} is deprecated and will be ignored \
         in a future version: move it to the settings file (--settings FILE, with `version = 1`)",
        rules.display()
    )
}

/// A line on stderr; a closed stderr is no reason to panic.
pub fn warn(message: &str) {
    let _ = writeln!(io::stderr().lock(), "{message}");
}
