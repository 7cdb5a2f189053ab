//! Handing memory back to the system after a burst of model work.

/// Hands memory freed by a one-off burst of work (compiling components,
/// parsing and optimising a model: hundreds of MB in small pieces) back to
/// the system; glibc keeps it otherwise, and the host's resident size would
/// count it for as long as the host runs.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and returns the allocator's free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
