//! The `lethe` command line: one file per command.

pub mod bench;
pub mod calibrate;
pub mod chat;
pub mod common;
pub mod compare;
pub mod eval;
pub mod fetch;
pub mod forge;
pub mod inspect;
pub mod patch;
pub mod profile;
pub mod report;
pub mod run;
pub mod serve;
pub mod serve_compat;
pub mod tokenize;
