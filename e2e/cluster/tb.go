package cluster

import (
	"fmt"
	"os"
	"sync"

	"k8s.io/klog/v2"
)

// processTB implements ktesting.TB for use outside `go test`: the in-process
// kube-apiserver helper (StartTestServer) wants a testing.TB-like value. Failures
// are recorded and logged; cleanups run when Cleanup is called by the owner.
type processTB struct {
	name     string
	mu       sync.Mutex
	failed   bool
	cleanups []func()
	tmpDirs  []string
}

func newProcessTB(name string) *processTB { return &processTB{name: name} }

func (t *processTB) Cleanup(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.cleanups = append(t.cleanups, f)
}

// runCleanups runs the registered cleanups in reverse order.
func (t *processTB) runCleanups() {
	t.mu.Lock()
	cs := t.cleanups
	t.cleanups = nil
	dirs := t.tmpDirs
	t.tmpDirs = nil
	t.mu.Unlock()
	for i := len(cs) - 1; i >= 0; i-- {
		cs[i]()
	}
	for _, d := range dirs {
		_ = os.RemoveAll(d)
	}
}

// Attr (testing.T.Attr, Go 1.25) only logs the attribute here.
func (t *processTB) Attr(key, value string) { t.Logf("attr %s=%s", key, value) }

// Chdir changes the process's working directory until the owner runs the
// cleanups, as testing.T.Chdir does for a test.
func (t *processTB) Chdir(dir string) {
	prev, err := os.Getwd()
	if err != nil {
		t.Fatalf("Chdir: %v", err)
	}
	if err := os.Chdir(dir); err != nil {
		t.Fatalf("Chdir: %v", err)
	}
	t.Cleanup(func() { _ = os.Chdir(prev) })
}

func (t *processTB) Error(args ...any)                 { t.Log(args...); t.Fail() }
func (t *processTB) Errorf(format string, args ...any) { t.Logf(format, args...); t.Fail() }
func (t *processTB) Fail() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.failed = true
}
func (t *processTB) FailNow() { t.Fail(); panic(fmt.Sprintf("%s: FailNow called", t.name)) }
func (t *processTB) Failed() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failed
}
func (t *processTB) Fatal(args ...any)                 { t.Log(args...); t.FailNow() }
func (t *processTB) Fatalf(format string, args ...any) { t.Logf(format, args...); t.FailNow() }
func (t *processTB) Helper()                           {}
func (t *processTB) Log(args ...any)                   { klog.InfoDepth(1, fmt.Sprint(args...)) }
func (t *processTB) Logf(format string, args ...any)   { klog.InfoDepth(1, fmt.Sprintf(format, args...)) }
func (t *processTB) Name() string                      { return t.name }
func (t *processTB) Setenv(key, value string)          { _ = os.Setenv(key, value) }
func (t *processTB) Skip(args ...any)                  { t.Log(args...) }
func (t *processTB) SkipNow()                          {}
func (t *processTB) Skipf(format string, args ...any)  { t.Logf(format, args...) }
func (t *processTB) Skipped() bool                     { return false }
func (t *processTB) TempDir() string {
	d, err := os.MkdirTemp("", "vramslice-e2e-tb-")
	if err != nil {
		panic(fmt.Sprintf("TempDir: %v", err))
	}
	t.mu.Lock()
	t.tmpDirs = append(t.tmpDirs, d)
	t.mu.Unlock()
	return d
}
