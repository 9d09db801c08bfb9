//! Readers for recorded training logs.
