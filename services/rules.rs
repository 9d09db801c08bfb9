//! `gradguard rules`: print a job's effective rules as TOML, a starting point
//! for a rules file and a check of what an override really changes.

use std::process::ExitCode;

use anyhow::anyhow;
use gradguard::config::RuleBook;

use crate::cli::{Failure, RulesArgs};

pub fn run(args: &RulesArgs) -> Result<ExitCode, Failure> {
    let book = match &args.rules {
        Some(path) => {
            let book = RuleBook::load(path).map_err(Failure::usage)?;
            // This command checks a rules file: say what is to move out of it.
            if book.section("kafka").is_some() {
                crate::cli::warn(&crate::cli::kafka_in_rules_note(path));
            }
            book
        }
        None => RuleBook::builtin(),
    };
    let rules = match &args.job {
        Some(job) => book.for_job(job, args.profile.as_deref()).map_err(Failure::usage)?,
        None => match &args.profile {
            Some(p) => book.for_job("", Some(p)).map_err(Failure::usage)?,
            None => book.defaults().clone(),
        },
    };
    let text = toml::to_string(&rules).map_err(|e| Failure::input(anyhow!("cannot print the rules: {e}")))?;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}
