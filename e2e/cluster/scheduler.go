package cluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-scheduler/app"
	schedulerconfig "k8s.io/kubernetes/cmd/kube-scheduler/app/config"
	"k8s.io/kubernetes/cmd/kube-scheduler/app/options"
	"k8s.io/kubernetes/pkg/scheduler"
)

// UnschedulableFlush is the bundled scheduler's --pod-max-in-unschedulable-pods-duration.
const UnschedulableFlush = 20 * time.Second

// SchedulerOptions describe one in-process kube-scheduler.
type SchedulerOptions struct {
	// Name is the profile's schedulerName (pods select it with spec.schedulerName).
	Name string
	// ExtenderURL, when set, configures vramslice-extender as the scheduler's
	// extender (filter, prioritize, bind, nodeCacheCapable, managed resource).
	ExtenderURL string
	// ResourceName is the extended resource the extender manages.
	ResourceName string
}

// schedulerConfig renders a KubeSchedulerConfiguration for opts.
func schedulerConfig(kubeconfig string, opts SchedulerOptions) string {
	cfg := fmt.Sprintf(`apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
leaderElection:
  leaderElect: false
clientConnection:
  kubeconfig: %q
  qps: 1000
  burst: 2000
profiles:
- schedulerName: %s
`, kubeconfig, opts.Name)
	if opts.ExtenderURL != "" {
		cfg += fmt.Sprintf(`extenders:
- urlPrefix: %q
  filterVerb: filter
  prioritizeVerb: prioritize
  weight: 1
  bindVerb: bind
  enableHTTPS: false
  nodeCacheCapable: true
  httpTimeout: 10s
  ignorable: false
  managedResources:
  - name: %s
    ignoredByScheduler: false
`, opts.ExtenderURL, opts.ResourceName)
	}
	return cfg
}

// writeSchedulerConfig writes opts' KubeSchedulerConfiguration into dir.
func writeSchedulerConfig(dir, kubeconfig string, opts SchedulerOptions) (string, error) {
	path := filepath.Join(dir, "scheduler-"+opts.Name+".yaml")
	if err := os.WriteFile(path, []byte(schedulerConfig(kubeconfig, opts)), 0o600); err != nil {
		return "", fmt.Errorf("writing scheduler config: %w", err)
	}
	return path, nil
}

// setupScheduler is kube-scheduler's own Setup for the config file at path. Secure
// serving is disabled (port 0): nothing needs its health endpoints here.
func setupScheduler(ctx context.Context, path string) (*schedulerconfig.CompletedConfig, *scheduler.Scheduler, error) {
	o := options.NewOptions()
	o.ConfigFile = path
	o.SecureServing.BindPort = 0
	// kube-scheduler retries a pod the extender rejected only on the next cluster
	// event or after this long (default 5 min). When a pod is deleted the scheduler
	// may retry before the extender has processed the same deletion, and then no
	// further event comes; the bundled scheduler must therefore flush sooner. This
	// is --pod-max-in-unschedulable-pods-duration; the chart should set it too.
	o.Deprecated.PodMaxInUnschedulablePodsDuration = UnschedulableFlush
	return app.Setup(ctx, o)
}

// startScheduler runs kube-scheduler's own Setup/Run in this process until ctx ends.
func startScheduler(ctx context.Context, dir, kubeconfig string, opts SchedulerOptions) (<-chan error, error) {
	path, err := writeSchedulerConfig(dir, kubeconfig, opts)
	if err != nil {
		return nil, err
	}
	cc, sched, err := setupScheduler(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("setting up kube-scheduler %s: %w", opts.Name, err)
	}
	errCh := make(chan error, 1)
	go func() {
		errCh <- runScheduler(ctx, cc, sched)
	}()
	return errCh, nil
}

// runScheduler is the part of kube-scheduler's app.Run this harness needs (event
// recording, informers, cache and handler sync, the scheduling loop). app.Run
// itself registers a process-global configz entry, so a second scheduler in the
// same process (a second cluster in one test binary, or the benchmark's plain
// scheduler) would fail; there is no leader election and no serving here.
func runScheduler(ctx context.Context, cc *schedulerconfig.CompletedConfig, sched *scheduler.Scheduler) error {
	cc.EventBroadcaster.StartRecordingToSink(ctx.Done())
	defer cc.EventBroadcaster.Shutdown()
	cc.InformerFactory.Start(ctx.Done())
	if cc.DynInformerFactory != nil {
		cc.DynInformerFactory.Start(ctx.Done())
	}
	cc.InformerFactory.WaitForCacheSync(ctx.Done())
	if cc.DynInformerFactory != nil {
		cc.DynInformerFactory.WaitForCacheSync(ctx.Done())
	}
	if err := sched.WaitForHandlersSync(ctx); err != nil {
		return fmt.Errorf("scheduler handlers not synced: %w", err)
	}
	klog.InfoS("kube-scheduler running", "profiles", len(sched.Profiles))
	sched.Run(ctx)
	return nil
}
