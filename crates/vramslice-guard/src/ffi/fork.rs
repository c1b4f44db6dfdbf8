//! `fork`: the child is a copy of the process with one thread, the one that forked. The
//! guard's lazy state is set up on first use in [`crate::set_up::SetUp`] cells; the child handler
//! tells every cell that a set-up the parent's other threads were running will not finish, so
//! the child starts it over. Nothing blocks in the fork handlers on a set-up: another library's
//! fork handler may already hold a lock (an allocator's) that the set-up needs. The handlers are
//! registered by a constructor, before anything can be set up.

extern "C" fn prepare() {
    super::fork_prepare();
}

extern "C" fn parent() {
    super::fork_parent();
}

extern "C" fn child() {
    super::shm::close_inherited_lock();
    super::forget_unfinished_set_ups();
    super::fork_child();
}

extern "C" fn register() {
    // One allocation first: an allocator preloaded beside the guard (jemalloc, tcmalloc) sets
    // itself up, registering its own fork handlers, at its first call. Registered before the
    // guard's, its prepare handler runs after the guard's (handlers registered later prepare
    // first) and its child handler before the guard's, so the guard's handlers, which allocate
    // and free, never run while it holds its locks.
    drop(std::hint::black_box(Box::new(0u64)));
    // SAFETY: the three handlers are extern "C" fns taking no arguments, as pthread_atfork wants.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        crate::log!(
            "vramslice-guard: pthread_atfork failed ({rc}): forked children share their parent's slot"
        );
    }
}

/// Registers the fork handlers when the library is loaded, before any set-up can start.
// SAFETY: `.init_array` holds pointers to functions taking no arguments, which the dynamic
// loader calls once at load; `register` is one.
#[used]
#[unsafe(link_section = ".init_array")]
static REGISTER: extern "C" fn() = register;
