/* Test library for RTLD_NEXT through the interposed dlsym: marker() here, another marker() in
 * libnext_b.so (a dependency loaded after this one). next_marker() must find libnext_b's. */
#define _GNU_SOURCE
#include <dlfcn.h>
int marker(void) { return 1; }
int next_marker(void) {
    int (*f)(void) = (int (*)(void))dlsym(RTLD_NEXT, "marker");
    return f ? f() : -1;
}
