//! The workloads. Each `run` builds its input from a fixed seed, does the work, checks
//! what it can, and returns a checksum plus everything it still holds.

pub mod collections;
pub mod growth;
pub mod json;
pub mod larson;
pub mod parser;
pub mod prodcons;
pub mod rayon;
pub mod regex;
pub mod threads;
