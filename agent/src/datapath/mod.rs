//! Kernel-facing code: load, attach, map sync.
