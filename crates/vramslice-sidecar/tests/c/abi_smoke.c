/* Exercises the C ABI through the committed header: refusal text, admission, peaks, metrics,
 * NULL handling. Built and run by tests/c_abi.rs; prints "ok" and exits 0 on success. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "vramslice_sidecar.h"

#define GIB (1ull << 30)
#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "check failed line %d: %s\n", __LINE__, #cond); return 1; } } while (0)

/* Run with VRAMSLICE_VRAM_LIMIT_BYTES (4 GiB) and VRAMSLICE_ACCOUNTING_DIR set: from_env works
 * with no GPU, and a manual runtime cannot raise that limit; with ABI_SMOKE_BAD_CONFIG also set (and VRAMSLICE_HIGH_WATER invalid) it must fail
 * naming the variable. */
static int from_env(void) {
    char err[256] = {0};
    vramslice_runtime *rt = NULL;
    vramslice_status s = vramslice_runtime_from_env(&rt, err, sizeof err);
    if (getenv("ABI_SMOKE_BAD_CONFIG")) {
        CHECK(s == VRAMSLICE_STATUS_CONFIG_ERROR && rt == NULL);
        CHECK(strstr(err, "VRAMSLICE_HIGH_WATER") != NULL);
    } else {
        CHECK(s == VRAMSLICE_STATUS_OK && rt != NULL);
        vramslice_permit *p = NULL;
        CHECK(vramslice_admit(rt, "m", NULL, NULL, 0, 1 << 20, &p, err, sizeof err) == VRAMSLICE_STATUS_OK);
        vramslice_permit_release(p);
        CHECK(vramslice_runtime_set_usage(rt, 1) == VRAMSLICE_STATUS_INVALID_ARGUMENT);
        vramslice_runtime_free(rt);
        /* A manual runtime's limit can only lower the container's (4 GiB here), never raise it. */
        rt = NULL;
        CHECK(vramslice_runtime_new_manual(16 * GIB, NULL, &rt, err, sizeof err) == VRAMSLICE_STATUS_OK);
        CHECK(vramslice_admit(rt, "big", NULL, NULL, 0, 10 * GIB, &p, err, sizeof err) == VRAMSLICE_STATUS_REFUSED);
        CHECK(strstr(err, "limit 4.0 GiB") != NULL);
        vramslice_runtime_free(rt);
    }
    printf("ok\n");
    return 0;
}

/* Run with VRAMSLICE_METRICS_ADDR set to an address another socket holds: a manual runtime
 * serves /metrics there as a runtime from the environment does, so it must fail naming it. */
static int metrics_addr_in_use(void) {
    char err[256] = {0};
    vramslice_runtime *rt = NULL;
    CHECK(vramslice_runtime_new_manual(4 * GIB, NULL, &rt, err, sizeof err) == VRAMSLICE_STATUS_CONFIG_ERROR);
    CHECK(rt == NULL);
    CHECK(strstr(err, getenv("VRAMSLICE_METRICS_ADDR")) != NULL);
    CHECK(vramslice_runtime_from_env(&rt, err, sizeof err) == VRAMSLICE_STATUS_CONFIG_ERROR);
    CHECK(strstr(err, getenv("VRAMSLICE_METRICS_ADDR")) != NULL);
    printf("ok\n");
    return 0;
}

/* Run with VRAMSLICE_METRICS_ADDR set to a free address: a forked child (a pre-fork worker)
 * frees its copy of the runtime without hanging, and once the parent frees its own the address
 * can be served again. */
static int metrics_after_fork(void) {
    char err[256] = {0};
    vramslice_runtime *rt = NULL;
    CHECK(vramslice_runtime_new_manual(4 * GIB, NULL, &rt, err, sizeof err) == VRAMSLICE_STATUS_OK);
    fflush(stdout);
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) {
        alarm(10); /* a hang ends the child with SIGALRM, which the parent sees */
        vramslice_runtime_free(rt);
        _exit(0);
    }
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    vramslice_runtime_free(rt);
    rt = NULL;
    CHECK(vramslice_runtime_new_manual(4 * GIB, NULL, &rt, err, sizeof err) == VRAMSLICE_STATUS_OK);
    vramslice_runtime_free(rt);
    printf("ok\n");
    return 0;
}

int main(void) {
    if (getenv("ABI_SMOKE_FROM_ENV")) return from_env();
    if (getenv("ABI_SMOKE_METRICS_IN_USE")) return metrics_addr_in_use();
    if (getenv("ABI_SMOKE_METRICS_FORK")) return metrics_after_fork();
    char err[256] = {0};
    vramslice_runtime *rt = NULL;
    CHECK(vramslice_runtime_new_manual(4 * GIB, NULL, &rt, err, sizeof err) == VRAMSLICE_STATUS_OK);
    CHECK(rt != NULL);

    vramslice_permit *p = NULL;
    vramslice_status s = vramslice_admit(rt, "llama-70b", NULL, NULL, 0, 6 * GIB, &p, err, sizeof err);
    CHECK(s == VRAMSLICE_STATUS_REFUSED);
    CHECK(strstr(err, "needs 6.0 GiB, limit 4.0 GiB") != NULL);
    CHECK(p == NULL);

    const char *names[] = {"batch"};
    const char *values[] = {"8"};
    CHECK(vramslice_admit(rt, "whisper", names, values, 1, GIB, &p, err, sizeof err) == VRAMSLICE_STATUS_OK);
    CHECK(vramslice_permit_reserved(p) == GIB);
    CHECK(vramslice_runtime_set_usage(rt, GIB / 2) == VRAMSLICE_STATUS_OK);
    /* The final reading, then a cache release that is not the job's. */
    CHECK(!vramslice_permit_end_measurement(p));
    CHECK(vramslice_runtime_set_usage(rt, 0) == VRAMSLICE_STATUS_OK);
    CHECK(vramslice_permit_complete(p) == GIB / 2);

    /* Learned: no declared need now reserves peak x 1.2. */
    CHECK(vramslice_admit(rt, "whisper", names, values, 1, 0, &p, err, sizeof err) == VRAMSLICE_STATUS_OK);
    CHECK(vramslice_permit_reserved(p) > GIB / 2);
    CHECK(vramslice_permit_out_of_memory(p) > GIB / 2);

    char small[8];
    size_t need = vramslice_render_metrics(rt, small, sizeof small);
    CHECK(need > sizeof small && strlen(small) == sizeof small - 1);
    char big[8192];
    CHECK(vramslice_render_metrics(rt, big, sizeof big) == need);
    CHECK(strstr(big, "vramslice_sidecar_oom_errors_total 1") != NULL);

    CHECK(vramslice_is_out_of_memory(2));
    CHECK(!vramslice_is_out_of_memory(1));
    CHECK(vramslice_backoff_ms(rt, 0) == 500 && vramslice_backoff_ms(rt, 2) == 2000);
    CHECK(vramslice_oom_retries(rt) == 3);

    /* NULLs are refused, not dereferenced. */
    CHECK(vramslice_admit(NULL, "x", NULL, NULL, 0, 1, &p, err, sizeof err) == VRAMSLICE_STATUS_INVALID_ARGUMENT);
    CHECK(vramslice_admit(rt, NULL, NULL, NULL, 0, 1, &p, NULL, 0) == VRAMSLICE_STATUS_INVALID_ARGUMENT);
    CHECK(vramslice_admit(rt, "x", NULL, NULL, 2, 1, &p, err, sizeof err) == VRAMSLICE_STATUS_INVALID_ARGUMENT);
    vramslice_permit_release(NULL);
    CHECK(!vramslice_permit_end_measurement(NULL));
    vramslice_runtime_free(NULL);

    vramslice_runtime_free(rt);
    printf("ok\n");
    return 0;
}
