//! loom models (written below).
