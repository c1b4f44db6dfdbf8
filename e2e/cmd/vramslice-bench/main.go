// Command vramslice-bench schedules N single-container pods onto M hollow nodes
// with the real kube-scheduler, once through vramslice-scheduler (with
// vramslice-extender: filter, prioritize, bind) and once through a plain
// kube-scheduler profile without the extender, on the same cluster, and prints
// pods/second for both and their ratio.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	"k8s.io/component-base/version"

	"github.com/vramslice/vramslice/e2e/cluster"
)

func main() {
	cluster.RunSchedulerProcess()
	pods := flag.Int("pods", 1000, "pods per run")
	nodes := flag.Int("nodes", 50, "hollow nodes")
	gpus := flag.Int("gpus", 2, "fake 80 GiB GPUs per node")
	timeout := flag.Duration("timeout", 8*time.Minute, "limit per run")
	binDir := flag.String("bin-dir", os.Getenv("VRAMSLICE_BIN_DIR"), "directory of vramslice-extender and vramslice-device-plugin (default <repo>/target/release: the benchmark measures release builds)")
	cpuProfile := flag.String("cpuprofile", "", "write a Go CPU profile of each run to <this>-<run>.pprof")
	order := flag.String("order", "plain,ext", "runs in this order (plain, ext), comma-separated; a name may repeat")
	withDRA := flag.Bool("dra", false, "instead of the device-plugin runs, start a DRA cluster of that size (node agents in mode: dra, the kubelet's DRA manager) and schedule as many claims and their pods with kube-scheduler's DynamicResources plugin")
	inProcess := flag.Bool("in-process-scheduler", false, "run both kube-schedulers inside the bench process (with the API server, etcd and the hollow kubelets) instead of each in its own process as in a real cluster")
	flag.Parse()
	if err := run(*pods, *nodes, *gpus, *timeout, strings.Split(*order, ","), *binDir, *cpuProfile, !*inProcess, *withDRA); err != nil {
		fmt.Fprintln(os.Stderr, "vramslice-bench:", err)
		os.Exit(1)
	}
}

func run(nPods, nNodes, nGPUs int, timeout time.Duration, order []string, binDir, cpuProfile string, schedulerProcesses, withDRA bool) error {
	if binDir == "" {
		root, err := cluster.FindRepoRoot()
		if err != nil {
			return err
		}
		binDir = filepath.Join(root, "target", "release")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if withDRA {
		// A cluster of its own, in a process of its own: the in-process Kubernetes components
		// do not stop cleanly enough to start a second cluster in one process.
		r, err := runDRA(ctx, nPods, nNodes, nGPUs, timeout, binDir, schedulerProcesses)
		if err != nil {
			return err
		}
		fmt.Printf("%d claims (1-4 GiB each) and their pods onto %d DRA hollow nodes x %d GPUs (kube-scheduler %s, DynamicResources plugin):\n",
			nPods, nNodes, nGPUs, version.Get().GitVersion)
		fmt.Printf("  all bound   DRA: %7.1f pods/s\n  all Running DRA: %7.1f pods/s\n", r.bound, r.running)
		return nil
	}
	t0 := time.Now()
	c, err := cluster.Start(ctx, cluster.Options{PlainScheduler: true, PluginPollInterval: "2s", BinDir: binDir,
		SchedulerProcesses: schedulerProcesses})
	if err != nil {
		return err
	}
	defer c.StopQuietly()
	if err := c.StartExtender(); err != nil {
		return err
	}
	names := make([]string, nNodes)
	for i := range names {
		names[i] = fmt.Sprintf("hollow-%02d", i)
		g := make([]cluster.FakeGPU, nGPUs)
		for j := range g {
			g[j] = cluster.GPU(names[i], j, "NVIDIA A100-SXM4-80GB", "80Gi")
		}
		if _, err := c.AddNode(names[i], g); err != nil {
			return err
		}
	}
	if err := c.WaitNodesAdvertise(ctx, names, 3*time.Minute); err != nil {
		return err
	}
	fmt.Printf("cluster: %d hollow nodes x %d GPUs, %d device plugins, extender; ready in %s\n",
		nNodes, nGPUs, nNodes, time.Since(t0).Round(time.Millisecond))

	fmt.Printf("binaries: %s\n", c.Opts.BinDir)
	if schedulerProcesses {
		fmt.Println("kube-schedulers: one process each, as in a real cluster (--in-process-scheduler: inside the bench process)")
	} else {
		fmt.Println("kube-schedulers: inside the bench process, sharing its Go runtime with the API server, etcd and the hollow kubelets")
	}
	pids := componentPids{extender: c.Extender.Pid()}
	for _, n := range c.Nodes() {
		pids.plugins = append(pids.plugins, n.Plugin.Pid())
	}
	var schedulerURLs []string
	for _, sp := range c.Schedulers {
		pids.schedulers = append(pids.schedulers, sp.Pid())
		schedulerURLs = append(schedulerURLs, sp.MetricsURL)
	}
	scrapeSchedulers := func() (series, error) { return schedulerSeries(schedulerURLs) }
	boundRates, runningRates := map[string][]float64{}, map[string][]float64{}
	for i, which := range order {
		var prefix, scheduler string
		switch which {
		case "ext":
			scheduler = cluster.SchedulerName
		case "plain":
			scheduler = cluster.PlainScheduler
		default:
			return fmt.Errorf("--order: unknown run %q (want plain or ext)", which)
		}
		prefix = fmt.Sprintf("%s%d", which, i)
		ext0, err := scrapeURL(c.ExtenderMetricsURL + "/metrics")
		if err != nil {
			return fmt.Errorf("extender metrics: %w", err)
		}
		sched0, err := scrapeSchedulers()
		if err != nil {
			return fmt.Errorf("scheduler metrics: %w", err)
		}
		if cpuProfile != "" {
			f, err := os.Create(fmt.Sprintf("%s-%s.pprof", cpuProfile, prefix))
			if err != nil {
				return err
			}
			defer f.Close()
			if err := pprof.StartCPUProfile(f); err != nil {
				return err
			}
		}
		cpu0 := sampleCPU(pids)
		var cpu1 cpuSample
		var ext1, sched1 series
		var scrapeErr error
		atBound := func() {
			cpu1 = sampleCPU(pids)
			if cpuProfile != "" {
				pprof.StopCPUProfile()
			}
			if ext1, scrapeErr = scrapeURL(c.ExtenderMetricsURL + "/metrics"); scrapeErr != nil {
				scrapeErr = fmt.Errorf("extender metrics: %w", scrapeErr)
				return
			}
			if sched1, scrapeErr = scrapeSchedulers(); scrapeErr != nil {
				scrapeErr = fmt.Errorf("scheduler metrics: %w", scrapeErr)
			}
		}
		rate, err := schedule(ctx, c, prefix, scheduler, nPods, timeout, atBound)
		if err != nil {
			return err
		}
		if scrapeErr != nil {
			return scrapeErr
		}
		var extDelta series
		if which == "ext" {
			extDelta = delta(ext0, ext1)
		}
		report(scheduler, nPods, extDelta, delta(sched0, sched1), cpu0, cpu1)
		boundRates[which] = append(boundRates[which], rate.bound)
		runningRates[which] = append(runningRates[which], rate.running)
		if err := cleanup(ctx, c, prefix, nPods); err != nil {
			return err
		}
	}
	fmt.Println()
	fmt.Printf("%d pods onto %d hollow nodes x %d GPUs (kube-scheduler %s, in-process API server):\n", nPods, nNodes, nGPUs, version.Get().GitVersion)
	for _, m := range []struct {
		what  string
		rates map[string][]float64
	}{{"all bound", boundRates}, {"all Running", runningRates}} {
		withExt, plain := best(m.rates["ext"]), best(m.rates["plain"])
		fmt.Printf("  %-11s with vramslice-extender: %7.1f pods/s, plain kube-scheduler: %7.1f pods/s (best of %d/%d)\n",
			m.what, withExt, plain, len(m.rates["ext"]), len(m.rates["plain"]))
		if withExt > 0 && plain > 0 {
			fmt.Printf("  ratio extender/plain (%s): %.2f\n", m.what, withExt/plain)
		}
	}
	return nil
}

// best is the highest rate of a list (0 when empty).
func best(rates []float64) float64 {
	b := 0.0
	for _, r := range rates {
		if r > b {
			b = r
		}
	}
	return b
}

func pod(prefix, scheduler string, i int) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s-%04d", prefix, i), Namespace: "default", Labels: map[string]string{"bench": prefix}},
		Spec: v1.PodSpec{
			SchedulerName: scheduler,
			Containers: []v1.Container{{Name: "main", Image: "registry.k8s.io/pause:3.10", Resources: v1.ResourceRequirements{
				Limits: v1.ResourceList{cluster.ResourceName: *resource.NewQuantity(int64(1+i%4), resource.DecimalSI)},
			}}},
		},
	}
}

// boundWatch counts the bench pods bound to a node from an informer (a watch,
// not polling: listing every pod every few milliseconds would load the very API
// server whose throughput is measured).
type boundWatch struct {
	mu         sync.Mutex
	bound      map[string]bool
	running    map[string]bool
	firstBound time.Time
	allBound   chan time.Time
	allRunning chan time.Time
	n          int
}

func (w *boundWatch) observe(obj interface{}) {
	p, ok := obj.(*v1.Pod)
	if !ok {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if p.Status.Phase == v1.PodRunning && !w.running[p.Name] {
		w.running[p.Name] = true
		if len(w.running) == w.n {
			w.allRunning <- time.Now()
		}
	}
	if p.Spec.NodeName == "" || w.bound[p.Name] {
		return
	}
	now := time.Now()
	if len(w.bound) == 0 {
		w.firstBound = now
	}
	w.bound[p.Name] = true
	if len(w.bound) == w.n {
		w.allBound <- now
	}
}

func (w *boundWatch) counts() (bound, running int, first time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.bound), len(w.running), w.firstBound
}

// rates are pods/second from the first create to the moment every pod is bound
// to a node, and to the moment every pod is Running.
type rates struct{ bound, running float64 }

// schedule creates n pods for the scheduler and measures how fast they are bound
// and then Running; atBound runs the moment the last pod is bound (the caller
// samples CPU and metrics there). The hollow kubelets start pods while others are
// still being scheduled, so a slower run does more pod starts inside its bound
// window; the Running rate includes every pod start in every run.
func schedule(ctx context.Context, c *cluster.Cluster, prefix, scheduler string, n int, timeout time.Duration, atBound func()) (rates, error) {
	create := func(i int) error {
		_, err := c.Client.CoreV1().Pods("default").Create(ctx, pod(prefix, scheduler, i), metav1.CreateOptions{})
		return err
	}
	return scheduleWith(ctx, c, prefix, scheduler, n, timeout, atBound, create)
}

// scheduleWith is schedule with the objects of pod i made by create (pods asking for units, or
// a claim and its pod in DRA mode).
func scheduleWith(ctx context.Context, c *cluster.Cluster, prefix, scheduler string, n int, timeout time.Duration, atBound func(), create func(i int) error) (rates, error) {
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	w := &boundWatch{bound: map[string]bool{}, running: map[string]bool{}, allBound: make(chan time.Time, 1),
		allRunning: make(chan time.Time, 1), n: n}
	factory := informers.NewSharedInformerFactoryWithOptions(c.Client, 0, informers.WithNamespace("default"),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = "bench=" + prefix }))
	inf := factory.Core().V1().Pods().Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    w.observe,
		UpdateFunc: func(_, obj interface{}) { w.observe(obj) },
	}); err != nil {
		return rates{}, err
	}
	factory.Start(watchCtx.Done())
	if !cache.WaitForCacheSync(watchCtx.Done(), inf.HasSynced) {
		return rates{}, fmt.Errorf("pod informer did not sync")
	}

	start := time.Now()
	var wg sync.WaitGroup
	errCh := make(chan error, 1)
	work := make(chan int)
	for g := 0; g < 32; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				if err := create(i); err != nil {
					select {
					case errCh <- err:
					default:
					}
					return
				}
			}
		}()
	}
	go func() {
		for i := 0; i < n; i++ {
			work <- i
		}
		close(work)
	}()
	wg.Wait()
	select {
	case err := <-errCh:
		return rates{}, fmt.Errorf("creating pods: %w", err)
	default:
	}
	createdIn := time.Since(start)
	deadline := time.After(time.Until(start.Add(timeout)))
	var r rates
	select {
	case done := <-w.allBound:
		atBound()
		_, running, firstBound := w.counts()
		d := done.Sub(start)
		r.bound = float64(n) / d.Seconds()
		window := done.Sub(firstBound)
		fmt.Printf("[%s] %d pods created in %s; all bound %s after the first create (%.1f pods/s end to end); "+
			"first to last bind %s (%.1f pods/s); %d Running at that moment\n",
			scheduler, n, createdIn.Round(time.Millisecond), d.Round(time.Millisecond), r.bound,
			window.Round(time.Millisecond), float64(n)/window.Seconds(), running)
	case <-deadline:
		bound, _, _ := w.counts()
		return r, fmt.Errorf("[%s] only %d of %d pods bound after %s", scheduler, bound, n, timeout)
	case <-ctx.Done():
		return r, ctx.Err()
	}
	select {
	case done := <-w.allRunning:
		d := done.Sub(start)
		r.running = float64(n) / d.Seconds()
		fmt.Printf("[%s] all Running %s after the first create (%.1f pods/s, every pod start included)\n",
			scheduler, d.Round(time.Millisecond), r.running)
		return r, nil
	case <-deadline:
		_, running, _ := w.counts()
		return r, fmt.Errorf("[%s] only %d of %d pods Running after %s", scheduler, running, n, timeout)
	case <-ctx.Done():
		return r, ctx.Err()
	}
}

func cleanup(ctx context.Context, c *cluster.Cluster, prefix string, n int) error {
	zero := int64(0)
	if err := c.Client.CoreV1().Pods("default").DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero},
		metav1.ListOptions{LabelSelector: "bench=" + prefix}); err != nil {
		return err
	}
	for i := 0; i < 600; i++ {
		list, err := c.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "bench=" + prefix})
		if err != nil {
			return err
		}
		if len(list.Items) == 0 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("pods of %s not gone after 60s", prefix)
}
