package cluster

// kube-scheduler in a process of its own, as in a real cluster. In-process, the
// scheduling cycle shares one Go runtime with the API server, etcd and every hollow
// kubelet: each network wait of the cycle (an extender's filter and prioritize calls)
// then queues the scheduler's goroutines behind theirs, which a separate
// kube-scheduler never pays. The benchmark runs its schedulers this way; the
// scenarios keep them in-process (one process is simpler to debug).
//
// The harness binary re-executes itself with schedulerConfigEnv set; the child calls
// RunSchedulerProcess first thing in main, becomes that scheduler, and serves its
// metrics (kube-scheduler's registry) as Prometheus text on loopback.

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"k8s.io/component-base/metrics/legacyregistry"
)

const (
	schedulerConfigEnv  = "VRAMSLICE_E2E_SCHEDULER_CONFIG"
	schedulerMetricsEnv = "VRAMSLICE_E2E_SCHEDULER_METRICS"
)

// SchedulerProcess is a kube-scheduler running as a child process.
type SchedulerProcess struct {
	*Process
	// MetricsURL serves the scheduler's metrics (Prometheus text).
	MetricsURL string
}

// RunSchedulerProcess turns this process into a kube-scheduler when the harness
// started it as one (Options.SchedulerProcesses), and exits when that scheduler
// stops; otherwise it returns at once. Binaries that start a Cluster with
// SchedulerProcesses call it first in main.
func RunSchedulerProcess() {
	config := os.Getenv(schedulerConfigEnv)
	if config == "" {
		return
	}
	if err := runSchedulerProcess(config, os.Getenv(schedulerMetricsEnv)); err != nil {
		fmt.Fprintln(os.Stderr, "kube-scheduler:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func runSchedulerProcess(config, metricsAddr string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	cc, sched, err := setupScheduler(ctx, config)
	if err != nil {
		return fmt.Errorf("setting up from %s: %w", config, err)
	}
	ln, err := net.Listen("tcp", metricsAddr)
	if err != nil {
		return fmt.Errorf("metrics listener: %w", err)
	}
	srv := &http.Server{Handler: legacyregistry.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	return runScheduler(ctx, cc, sched)
}

// startSchedulerProcess starts opts' kube-scheduler as a child of this binary and
// waits until it serves its metrics.
func startSchedulerProcess(ctx context.Context, dir, kubeconfig string, opts SchedulerOptions) (*SchedulerProcess, error) {
	path, err := writeSchedulerConfig(dir, kubeconfig, opts)
	if err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("finding this binary to run kube-scheduler: %w", err)
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	env := []string{schedulerConfigEnv + "=" + path, schedulerMetricsEnv + "=" + addr}
	p, err := startProcessWithEnv("kube-scheduler "+opts.Name, self, nil, env, filepath.Join(dir, "logs", "scheduler-"+opts.Name+".log"))
	if err != nil {
		return nil, err
	}
	sp := &SchedulerProcess{Process: p, MetricsURL: "http://" + addr + "/metrics"}
	deadline := time.Now().Add(time.Minute)
	for {
		if exited, exitErr := p.Exited(); exited {
			return nil, fmt.Errorf("kube-scheduler %s exited at start (%v): %s", opts.Name, exitErr, p.Tail(2000))
		}
		resp, err := http.Get(sp.MetricsURL)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return sp, nil
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			p.Kill()
			return nil, fmt.Errorf("kube-scheduler %s did not serve %s within a minute: %s", opts.Name, sp.MetricsURL, p.Tail(2000))
		}
		time.Sleep(100 * time.Millisecond)
	}
}
