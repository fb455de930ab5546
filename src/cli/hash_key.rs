//! `imagegate hash-key`: read a gateway key on stdin, print the form `clients[].key_hash` stores.

use std::io::Read;
use std::process::ExitCode;

use crate::config;
use crate::startup::StartupError;

pub fn run() -> Result<ExitCode, StartupError> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(StartupError::Stdin)?;
    let key = input.trim_end_matches(['\r', '\n']);
    if key.trim().is_empty() {
        return Err(StartupError::NoKeyOnStdin);
    }
    println!("{}", config::hash_key(key));
    Ok(ExitCode::SUCCESS)
}
