package main

// The demo's story (--story): what vramslice is for, shown on the running cluster.
//
//  1. Running pods use memory on their fake GPUs, a share of their limit that moves over time
//     (the demo.vramslice.io/usage annotation on the example pods); the device plugins measure
//     it and publish LIVE USED per GPU and per pod in GpuNode status.
//  2. A process outside Kubernetes takes most of the GPU where the next pod would land; the
//     extender sees it in the live reading and places that pod on another GPU.
//  3. One pod grows past its limit; the watchdog posts a Warning Event on exactly that pod.
//
// Usage is written into the node's fake-GPU file as processes carrying the pod's UID, which is
// what NVML's per-process list plus /proc give the plugin on a real node.

import (
	"context"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"

	"github.com/vramslice/vramslice/e2e/cluster"
)

// usageAnnotation on a demo pod: the share of its limit it uses, "LOW-HIGH" (moving between the
// two) or one fraction, e.g. "0.3-0.7". Only the local demo reads it.
const usageAnnotation = "demo.vramslice.io/usage"

// outsidePID is the fake process of step 2 that belongs to no pod.
const outsidePID = 4242

// usagePeriod is how long a pod's usage takes to go from LOW to HIGH and back.
const usagePeriod = 30 * time.Second

// usageSpec is a parsed usage annotation.
type usageSpec struct{ low, high float64 }

// parseUsage reads "LOW-HIGH" or "F"; fractions of the limit in [0, 2] (above 1 is past the limit).
func parseUsage(text string) (usageSpec, error) {
	lowText, highText, ranged := strings.Cut(strings.TrimSpace(text), "-")
	if !ranged {
		highText = lowText
	}
	low, errLow := strconv.ParseFloat(strings.TrimSpace(lowText), 64)
	high, errHigh := strconv.ParseFloat(strings.TrimSpace(highText), 64)
	switch {
	case errLow != nil || errHigh != nil:
		return usageSpec{}, fmt.Errorf("%s=%q: want LOW-HIGH fractions of the limit, e.g. 0.3-0.7", usageAnnotation, text)
	case low < 0 || high > 2 || low > high || math.IsNaN(low) || math.IsNaN(high):
		return usageSpec{}, fmt.Errorf("%s=%q: want 0 <= LOW <= HIGH <= 2", usageAnnotation, text)
	}
	return usageSpec{low: low, high: high}, nil
}

// at is the fraction at elapsed time t: a triangle wave from LOW to HIGH and back each period,
// shifted by phase (0..1) so that pods do not move in step.
func (u usageSpec) at(t, period time.Duration, phase float64) float64 {
	if period <= 0 || u.high == u.low {
		return u.low
	}
	x := math.Mod(t.Seconds()/period.Seconds()+phase, 1)
	tri := 1 - math.Abs(2*x-1) // 0 → 1 → 0 over one period
	return u.low + (u.high-u.low)*tri
}

// phaseOf spreads pods over the period by name.
func phaseOf(name string) float64 {
	h := fnv.New32a()
	_, _ = h.Write([]byte(name))
	return float64(h.Sum32()%1000) / 1000
}

// liveUsage keeps the fake GPUs' process lists in step with the running pods.
type liveUsage struct {
	c     *cluster.Cluster
	start time.Time
	base  map[string][]cluster.FakeGPU // each node's GPUs as configured, no processes

	mu      sync.Mutex
	outside map[string]cluster.FakeGPUProcess // GPU UUID → a process that belongs to no pod
	grown   map[types.UID]float64             // pods forced to this share of their limit
}

func newLiveUsage(c *cluster.Cluster) *liveUsage {
	l := &liveUsage{c: c, start: time.Now(), base: map[string][]cluster.FakeGPU{},
		outside: map[string]cluster.FakeGPUProcess{}, grown: map[types.UID]float64{}}
	for _, n := range c.Nodes() {
		gpus := c.GPUs(n.Name)
		for i := range gpus {
			gpus[i].Processes = nil
		}
		l.base[n.Name] = gpus
	}
	return l
}

// run rewrites the fake GPUs every second until ctx ends.
func (l *liveUsage) run(ctx context.Context, report io.Writer) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		if err := l.write(ctx); err != nil && ctx.Err() == nil {
			fmt.Fprintf(report, "live usage: %v\n", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (l *liveUsage) setOutside(gpu string, p cluster.FakeGPUProcess) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.outside[gpu] = p
}

func (l *liveUsage) grow(uid types.UID, share float64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.grown[uid] = share
}

// write puts one process per annotated running pod on its GPU, plus the outside processes.
func (l *liveUsage) write(ctx context.Context) error {
	pods, err := l.c.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	l.mu.Lock()
	procs := map[string][]cluster.FakeGPUProcess{}
	for gpu, p := range l.outside {
		procs[gpu] = append(procs[gpu], p)
	}
	elapsed := time.Since(l.start)
	for i := range pods.Items {
		p := &pods.Items[i]
		text, annotated := p.Annotations[usageAnnotation]
		if !annotated || p.Status.Phase != v1.PodRunning {
			continue
		}
		spec, err := parseUsage(text)
		if err != nil {
			l.mu.Unlock()
			return fmt.Errorf("pod %s: %w", p.Name, err)
		}
		gpu, limit := gpuAndLimit(p)
		if gpu == "" || limit == 0 {
			continue // not started through the device plugin (yet)
		}
		share := spec.at(elapsed, usagePeriod, phaseOf(p.Name))
		if grown, ok := l.grown[p.UID]; ok {
			share = grown
		}
		procs[gpu] = append(procs[gpu], cluster.FakeGPUProcess{
			PID: pidOf(p.Name), Used: strconv.FormatUint(uint64(share*float64(limit)), 10), PodUID: string(p.UID),
		})
	}
	l.mu.Unlock()
	for node, base := range l.base {
		gpus := append([]cluster.FakeGPU(nil), base...)
		for i := range gpus {
			gpus[i].Processes = capToTotal(procs[gpus[i].UUID], gpus[i].Total)
		}
		if err := l.c.SetGPUs(node, gpus); err != nil {
			return err
		}
	}
	return nil
}

// capToTotal drops the processes that would make a GPU use more than it has (the fake
// backend refuses such a file, as a real GPU cannot be over-full).
func capToTotal(procs []cluster.FakeGPUProcess, total string) []cluster.FakeGPUProcess {
	q, err := resource.ParseQuantity(total)
	if err != nil {
		return procs
	}
	left := q.Value()
	var out []cluster.FakeGPUProcess
	for _, p := range procs {
		used, err := strconv.ParseInt(p.Used, 10, 64)
		if err != nil || used > left {
			continue
		}
		left -= used
		out = append(out, p)
	}
	return out
}

// pidOf is a stable fake PID per pod name.
func pidOf(name string) int {
	h := fnv.New32a()
	_, _ = h.Write([]byte(name))
	return 10000 + int(h.Sum32()%50000)
}

// gpuAndLimit is the GPU and limit the device plugin's Allocate gave the pod's first
// container with one (as the hollow node recorded them).
func gpuAndLimit(p *v1.Pod) (string, uint64) {
	for _, ctr := range p.Spec.Containers {
		env := cluster.ContainerEnv(p, ctr.Name)
		if env == nil || env["VRAMSLICE_GPU_UUID"] == "" {
			continue
		}
		limit, _ := strconv.ParseUint(env["VRAMSLICE_VRAM_LIMIT_BYTES"], 10, 64)
		return env["VRAMSLICE_GPU_UUID"], limit
	}
	return "", 0
}

// story runs the three steps, printing the live tables and one line per step.
func story(ctx context.Context, c *cluster.Cluster, out io.Writer) error {
	live := newLiveUsage(c)
	go live.run(ctx, out)

	// ① Live usage.
	if err := waitFor(ctx, 45*time.Second, func() (bool, error) { return podsMeasured(ctx, c) }); err != nil {
		return fmt.Errorf("step 1, live usage never showed in GpuNode status: %w", err)
	}
	printLive(ctx, c, out)
	fmt.Fprintln(out, "① Running pods use memory on their GPUs; each device plugin measures it (NVML on a real node) and publishes LIVE USED per GPU and per pod in its GpuNode.")

	// ② A process outside Kubernetes steers the next pod away.
	const probeGiB = 8
	fmt.Fprintf(out, "\n② placing demo-probe (%d GiB) to see which GPU the next pod of that size gets...\n", probeGiB)
	probeGPU, err := placeAndWait(ctx, c, "demo-probe", probeGiB)
	if err != nil {
		return fmt.Errorf("step 2: %w", err)
	}
	if err := deleteAndWait(ctx, c, "demo-probe"); err != nil {
		return fmt.Errorf("step 2: %w", err)
	}
	_, gpu, err := gpuStatus(ctx, c, probeGPU)
	if err != nil {
		return fmt.Errorf("step 2: %w", err)
	}
	// Take what the pods on that GPU were not given, less a quarter of the next pod's request.
	// The GPU still advertises free units, but the extender's effective free memory (live free
	// minus what its pods may still grow into, minus headroom) is now below the request.
	var limits int64
	for _, p := range gpu.Pods {
		limits += int64(p.LimitBytes)
	}
	take := int64(gpu.TotalBytes) - limits - probeGiB<<30/4
	if take <= 0 {
		return fmt.Errorf("step 2: %s has no unallocated memory to take", probeGPU)
	}
	fmt.Fprintf(out, "   demo-probe got %s; deleted it; now a process outside Kubernetes (pid %d) takes %.1f GiB there\n", probeGPU, outsidePID, float64(take)/(1<<30))
	live.setOutside(probeGPU, cluster.FakeGPUProcess{PID: outsidePID, Used: strconv.FormatInt(take, 10)})
	if err := waitFor(ctx, 30*time.Second, func() (bool, error) {
		_, g, err := gpuStatus(ctx, c, probeGPU)
		for _, p := range g.ProcessesWithoutPod {
			if p.PID == outsidePID {
				return true, nil
			}
		}
		return false, err
	}); err != nil {
		return fmt.Errorf("step 2, the outside process never showed on %s: %w", probeGPU, err)
	}
	// The extender watches GpuNodes; give it a moment past the API server.
	time.Sleep(time.Second)
	steeredGPU, err := placeAndWait(ctx, c, "demo-steered", probeGiB)
	if err != nil {
		return fmt.Errorf("step 2: %w", err)
	}
	if err := waitFor(ctx, 30*time.Second, func() (bool, error) { return podListed(ctx, c, "demo-steered") }); err != nil {
		return fmt.Errorf("step 2, demo-steered never showed in GpuNode status: %w", err)
	}
	printLive(ctx, c, out)
	if steeredGPU == probeGPU {
		return fmt.Errorf("step 2: demo-steered landed on %s although a process outside Kubernetes left it less than %d GiB free", probeGPU, probeGiB)
	}
	fmt.Fprintf(out, "② A process outside Kubernetes took %.1f GiB of %s, where an %d GiB pod had just landed; the GPU still advertised free units, but its effective free memory (live free, less what its pods may still grow into, less headroom) was below %d GiB, so the next %d GiB pod went to %s.\n",
		float64(take)/(1<<30), probeGPU, probeGiB, probeGiB, probeGiB, steeredGPU)

	// ③ A pod grows past its limit.
	victim, err := smallestAnnotatedRunning(ctx, c, probeGPU)
	if err != nil {
		return fmt.Errorf("step 3: %w", err)
	}
	fmt.Fprintf(out, "\n③ %s now uses 1.5 × its limit...\n", victim.Name)
	live.grow(victim.UID, 1.5)
	var event string
	if err := waitFor(ctx, 45*time.Second, func() (bool, error) {
		evs, err := c.Client.CoreV1().Events("default").List(ctx, metav1.ListOptions{
			FieldSelector: fields.OneTermEqualSelector("involvedObject.name", victim.Name).String(),
		})
		if err != nil {
			return false, err
		}
		for _, e := range evs.Items {
			if e.Type == v1.EventTypeWarning && strings.HasPrefix(e.Reason, "Vram") {
				event = e.Reason + ": " + e.Message
				return true, nil
			}
		}
		return false, nil
	}); err != nil {
		return fmt.Errorf("step 3, no watchdog Event on %s: %w", victim.Name, err)
	}
	printLive(ctx, c, out)
	fmt.Fprintf(out, "   event on pod %s: %s\n", victim.Name, event)
	fmt.Fprintf(out, "③ Pod %s grew to 1.5 × its limit (a process the guard does not cover, simulated); the device plugin's watchdog saw it and posted a Warning Event on exactly that pod.\n", victim.Name)
	return nil
}

// podsMeasured is true when every annotated running pod shows live usage in its GpuNode.
func podsMeasured(ctx context.Context, c *cluster.Cluster) (bool, error) {
	pods, err := c.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
	if err != nil {
		return false, err
	}
	used := map[string]uint64{}
	for _, n := range c.Nodes() {
		st, err := c.GpuNode(ctx, n.Name)
		if err != nil {
			return false, nil
		}
		for _, g := range st.GPUs {
			for _, p := range g.Pods {
				used[p.UID] += p.UsedBytes
			}
		}
	}
	for _, p := range pods.Items {
		if _, ok := p.Annotations[usageAnnotation]; ok && p.Status.Phase == v1.PodRunning && used[string(p.UID)] == 0 {
			return false, nil
		}
	}
	return true, nil
}

// placeAndWait creates a pod asking for gib GiB through vramslice-scheduler and returns the GPU
// it was given once it runs.
func placeAndWait(ctx context.Context, c *cluster.Cluster, name string, gib int64) (string, error) {
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: v1.PodSpec{SchedulerName: cluster.SchedulerName, Containers: []v1.Container{{
			Name: "main", Image: "registry.k8s.io/pause:3.10",
			Resources: v1.ResourceRequirements{Limits: v1.ResourceList{cluster.ResourceName: *resource.NewQuantity(gib, resource.DecimalSI)}},
		}}},
	}
	if _, err := c.Client.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return "", fmt.Errorf("creating %s: %w", name, err)
	}
	var gpu string
	err := waitFor(ctx, 60*time.Second, func() (bool, error) {
		p, err := c.Client.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		if p.Status.Phase == v1.PodFailed {
			return false, fmt.Errorf("%s failed: %s", name, p.Status.Message)
		}
		gpu, _ = gpuAndLimit(p)
		return p.Status.Phase == v1.PodRunning && gpu != "", nil
	})
	if err != nil {
		return "", fmt.Errorf("%s did not start: %w", name, err)
	}
	return gpu, nil
}

// deleteAndWait deletes a pod and waits until no GpuNode lists it any more.
func deleteAndWait(ctx context.Context, c *cluster.Cluster, name string) error {
	zero := int64(0)
	if err := c.Client.CoreV1().Pods("default").Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		return fmt.Errorf("deleting %s: %w", name, err)
	}
	return waitFor(ctx, 60*time.Second, func() (bool, error) {
		listed, err := podListed(ctx, c, name)
		return !listed, err
	})
}

// podListed is whether a GpuNode lists the pod on one of its GPUs (unreadable GpuNodes count
// as not listing it yet; the callers poll).
func podListed(ctx context.Context, c *cluster.Cluster, name string) (bool, error) {
	for _, n := range c.Nodes() {
		st, err := c.GpuNode(ctx, n.Name)
		if err != nil {
			continue
		}
		for _, g := range st.GPUs {
			for _, p := range g.Pods {
				if p.Name == name {
					return true, nil
				}
			}
		}
	}
	return false, nil
}

// gpuStatus finds a GPU in the GpuNodes.
func gpuStatus(ctx context.Context, c *cluster.Cluster, uuid string) (string, cluster.GpuNodeGPU, error) {
	for _, n := range c.Nodes() {
		st, err := c.GpuNode(ctx, n.Name)
		if err != nil {
			return "", cluster.GpuNodeGPU{}, err
		}
		for _, g := range st.GPUs {
			if g.UUID == uuid {
				return n.Name, g, nil
			}
		}
	}
	return "", cluster.GpuNodeGPU{}, fmt.Errorf("no GpuNode lists %s", uuid)
}

// smallestAnnotatedRunning is the running demo pod with the smallest limit, not on GPU avoid
// (there a process outside Kubernetes leaves no room to grow).
func smallestAnnotatedRunning(ctx context.Context, c *cluster.Cluster, avoid string) (*v1.Pod, error) {
	pods, err := c.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	var best *v1.Pod
	var bestLimit uint64
	for i := range pods.Items {
		p := &pods.Items[i]
		gpu, limit := gpuAndLimit(p)
		if _, ok := p.Annotations[usageAnnotation]; !ok || p.Status.Phase != v1.PodRunning || gpu == avoid || limit == 0 {
			continue
		}
		if best == nil || limit < bestLimit || (limit == bestLimit && p.Name < best.Name) {
			best, bestLimit = p, limit
		}
	}
	if best == nil {
		return nil, fmt.Errorf("no running pod with %s outside %s", usageAnnotation, avoid)
	}
	return best, nil
}

// printLive prints LIVE USED per GPU and per pod, from the GpuNodes the device plugins publish.
func printLive(ctx context.Context, c *cluster.Cluster, out io.Writer) {
	gib := func(b uint64) string { return fmt.Sprintf("%.1f GiB", float64(b)/(1<<30)) }
	tw := tabwriter.NewWriter(out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "\nNODE\tGPU\tTOTAL\tALLOCATED\tLIVE USED\tOF IT OUTSIDE PODS\tLIVE FREE")
	type podRow struct{ name, node, gpu, limit, used string }
	var pods []podRow
	for _, n := range c.Nodes() {
		st, err := c.GpuNode(ctx, n.Name)
		if err != nil {
			fmt.Fprintf(tw, "%s\t(no GpuNode yet: %v)\n", n.Name, err)
			continue
		}
		for _, g := range st.GPUs {
			var outside uint64
			for _, p := range g.ProcessesWithoutPod {
				outside += p.UsedBytes
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d units\t%s\t%s\t%s\n", n.Name, g.UUID, gib(g.TotalBytes), g.AllocatedUnits, gib(g.UsedBytes), gib(outside), gib(g.FreeBytes))
			for _, p := range g.Pods {
				pods = append(pods, podRow{p.Name, n.Name, g.UUID, gib(p.LimitBytes), gib(p.UsedBytes)})
			}
		}
	}
	_ = tw.Flush()
	sort.Slice(pods, func(i, j int) bool { return pods[i].name < pods[j].name })
	tw = tabwriter.NewWriter(out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "\nPOD\tNODE\tGPU\tLIMIT\tLIVE USED")
	for _, p := range pods {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", p.name, p.node, p.gpu, p.limit, p.used)
	}
	_ = tw.Flush()
}

// waitFor polls cond every 250 ms until it is true, fails, or timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %s", timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}
