//! Synthetic training traces with injected faults (filled in below).
