//! The `gradguard` command: parse, dispatch, map failures to exit codes
//! (see [`cli`]). Each subcommand lives in its own module; the developer tools
//! (simulate, loadgen, sink, generate) under [`dev`]. The line formats the
//! commands share are in [`output`].

mod cli;
mod dev;
mod follow;
mod output;
mod query_cli;
mod replay;
mod report;
mod rules;
mod serve;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    // The matches too: `serve` tells a flag given from its default.
    let matches = cli::Cli::command().get_matches();
    let cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match &cli.command {
        cli::Command::Replay(args) => replay::run(args),
        cli::Command::Generate(args) => dev::generate::run(args),
        cli::Command::Rules(args) => rules::run(args),
        cli::Command::Serve(args) => {
            let matches = matches.subcommand_matches("serve").expect("serve's own matches");
            serve::run(args, matches).map(|()| ExitCode::SUCCESS)
        }
        cli::Command::Follow(args) => follow::run(args),
        cli::Command::Simulate(args) => dev::simulate::run(args),
        cli::Command::Loadgen(args) => dev::loadgen::run(args),
        cli::Command::Sink(args) => dev::sink::run(args),
        cli::Command::Jobs(args) => query_cli::jobs(args),
        cli::Command::Job(args) => query_cli::job(args),
        cli::Command::Anomalies(args) => query_cli::anomalies(args),
        cli::Command::Advice(args) => query_cli::advice(args),
        cli::Command::Watch(args) => query_cli::watch(args),
        cli::Command::Auth(command) => cli::auth(command),
        cli::Command::Completions { shell } => cli::completions(*shell),
    };
    result.unwrap_or_else(|failure| {
        cli::warn(&format!("gradguard: {}", cli::describe(&failure.error)));
        failure.exit_code()
    })
}
