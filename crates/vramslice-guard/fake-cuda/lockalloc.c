/* A stand-in for an allocator preloaded beside the guard (jemalloc, tcmalloc): it registers its
 * fork handlers at its first allocation, as they do, and holds its locks from its prepare
 * handler until its parent or child handler. A real allocator called in that window deadlocks;
 * this one says so on stderr and aborts, so a test sees it at once. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static int registered;
static volatile int locked;

static void lock_all(void) { locked = 1; }
static void unlock_all(void) { locked = 0; }

static void enter(void) {
    if (!registered) {
        registered = 1;
        pthread_atfork(lock_all, unlock_all, unlock_all);
    }
    if (locked) {
        static const char msg[] = "lockalloc: allocator called while its fork lock is held (a real allocator deadlocks here)\n";
        if (write(2, msg, sizeof msg - 1) < 0) { /* nothing more to do */ }
        abort();
    }
}

void *malloc(size_t n) { enter(); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { enter(); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { enter(); return __libc_realloc(p, n); }
void free(void *p) { if (p) enter(); __libc_free(p); }
void *memalign(size_t a, size_t n) { enter(); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { enter(); return __libc_memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    enter();
    void *p = __libc_memalign(a, n);
    if (!p) return 12; /* ENOMEM */
    *out = p;
    return 0;
}
