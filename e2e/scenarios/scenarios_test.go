// Package scenarios holds vramslice's end-to-end scenarios against a real
// kube-apiserver and kube-scheduler, hollow nodes running the kubelet's device
// manager, and our device plugin and extender binaries.
package scenarios

import (
	"fmt"
	"math/rand"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vramslice/vramslice/e2e/cluster"
)

const (
	a100 = "NVIDIA A100-SXM4-80GB"
	l4   = "NVIDIA L4"
	t4   = "Tesla T4"
)

// Scenario 1: two nodes with GPUs of different sizes; pods land only where they
// fit, and the container env carries the right GPU UUID and limit.
func TestScenario1_TwoNodesDifferentSizes(t *testing.T) {
	c := newCluster(t, cluster.Options{}, map[string][]cluster.FakeGPU{
		"big":   {cluster.GPU("big", 0, a100, "80Gi")},
		"small": {cluster.GPU("small", 0, l4, "24Gi")},
	})
	steps := []struct {
		name string
		gib  int64
		want string // node, "" = must stay Pending
	}{
		{"s1-60g", 60, "big"},   // only the 80 GiB GPU has room
		{"s1-22g", 22, "small"}, // big has 20 GiB left
		{"s1-10g", 10, "big"},   // small has 2 GiB left
		{"s1-12g", 12, ""},      // big 10, small 2: fits nowhere
	}
	for _, s := range steps {
		createPod(t, c, vramPod(s.name, s.gib))
		if s.want == "" {
			msg := waitUnschedulable(t, c, s.name)
			t.Logf("%s (%d GiB) Pending: %s", s.name, s.gib, msg)
			continue
		}
		p := waitRunning(t, c, s.name)
		pl := checkRunningPod(t, p)
		if pl.Node != s.want {
			t.Fatalf("%s (%d GiB) landed on %s, want %s", s.name, s.gib, pl.Node, s.want)
		}
		t.Logf("%s (%d GiB) -> node %s GPU %s limit %d bytes", s.name, s.gib, pl.Node, pl.EnvGPU, pl.LimitBytes)
	}
	checkGpuNodesAgree(t, c, map[string]uint64{"GPU-big-0": 70, "GPU-small-0": 22})

	// Deleting a pod frees its memory: the pending 12 GiB pod then fits on big.
	deletePod(t, c, "s1-10g")
	pl := checkRunningPod(t, waitRunning(t, c, "s1-12g"))
	if pl.Node != "big" {
		t.Fatalf("s1-12g landed on %s after s1-10g was deleted, want big", pl.Node)
	}
	t.Logf("after deleting s1-10g: s1-12g (12 GiB) -> node %s GPU %s", pl.Node, pl.EnvGPU)
	checkGpuNodesAgree(t, c, map[string]uint64{"GPU-big-0": 72, "GPU-small-0": 22})
}

// Scenario 2: memory used outside Kubernetes (a non-pod process in the fake
// file) shrinks live free memory; the next pod that no longer fits there goes to
// the other node, and a pod pinned there stays Pending with the live reason.
func TestScenario2_LiveUsageSteersPlacement(t *testing.T) {
	c := newCluster(t, cluster.Options{}, map[string][]cluster.FakeGPU{
		"busy":  {cluster.GPU("busy", 0, a100, "40Gi")},
		"quiet": {cluster.GPU("quiet", 0, a100, "40Gi")},
	})
	gpus := c.GPUs("busy")
	gpus[0].Used = "30Gi"
	gpus[0].Processes = []cluster.FakeGPUProcess{{PID: 4242, Used: "30Gi"}}
	if err := c.SetGPUs("busy", gpus); err != nil {
		t.Fatal(err)
	}
	until(t, 30*time.Second, "GpuNode busy to show the non-pod usage", func() (bool, error) {
		st, err := c.GpuNode(c.Context(), "busy")
		if err != nil {
			return false, err
		}
		return len(st.GPUs) == 1 && st.GPUs[0].FreeBytes <= 10<<30, nil
	})
	t.Log("fake GPU busy now reports 30 GiB used by PID 4242 (no pod)")

	createPod(t, c, vramPod("s2-next", 20))
	pl := checkRunningPod(t, waitRunning(t, c, "s2-next"))
	if pl.Node != "quiet" {
		t.Fatalf("s2-next (20 GiB) landed on %s; busy has only ~10 GiB live free", pl.Node)
	}
	t.Logf("s2-next (20 GiB) -> %s", pl.Node)

	createPod(t, c, vramPod("s2-pinned", 20, onNode("busy")))
	msg := waitUnschedulable(t, c, "s2-pinned")
	var events []string
	until(t, 30*time.Second, "a FailedScheduling event naming the live reading", func() (bool, error) {
		events = podEvents(t, c, "s2-pinned")
		for _, e := range events {
			if strings.HasPrefix(e, "FailedScheduling") && strings.Contains(e, "live") {
				return true, nil
			}
		}
		return false, nil
	})
	t.Logf("s2-pinned Pending: %s; events: %q", msg, events)
}

// Scenario 3: 200 pods created at once against 4 GPUs: no GPU over-committed,
// every unplaced pod Pending with a reason, GpuNode agreeing with the pods.
func TestScenario3_NoDoubleBooking(t *testing.T) {
	c := newCluster(t, cluster.Options{}, map[string][]cluster.FakeGPU{
		"n1": {cluster.GPU("n1", 0, t4, "16Gi"), cluster.GPU("n1", 1, t4, "16Gi")},
		"n2": {cluster.GPU("n2", 0, l4, "24Gi"), cluster.GPU("n2", 1, l4, "24Gi")},
	})
	rng := rand.New(rand.NewSource(42))
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	start := time.Now()
	for i := 0; i < 200; i++ {
		p := vramPod(fmt.Sprintf("s3-%03d", i), int64(1+rng.Intn(4)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.Client.CoreV1().Pods(ns).Create(c.Context(), p, metav1.CreateOptions{}); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("creating pods: %v", err)
	}
	pods := settle(t, c, "s3-", 4*time.Minute)
	used := checkNoOvercommit(t, c, pods)
	running := 0
	for _, p := range pods {
		if p.Status.Phase == "Running" {
			running++
		}
	}
	t.Logf("200 pods settled in %s: %d Running, %d Pending; units per GPU %v (capacity 16,16,24,24)",
		time.Since(start).Round(time.Millisecond), running, len(pods)-running, used)
	if running == 0 {
		t.Fatal("no pod was placed")
	}
	total := uint64(0)
	for _, u := range used {
		total += u
	}
	if total < 60 {
		t.Errorf("only %d of 80 units in use after 200 pods of 1-4 GiB: placement stalled", total)
	}
	checkGpuNodesAgree(t, c, used)
	checkGpuNodePods(t, c, "s3-")
}

// Scenario 4: kill and restart the extender and a device plugin, and restart a
// node's device manager (kubelet restart), in the middle of a run: nothing is
// double-booked, nothing lost, placement continues.
func TestScenario4_Restarts(t *testing.T) {
	c := newCluster(t, cluster.Options{}, map[string][]cluster.FakeGPU{
		"r1": {cluster.GPU("r1", 0, t4, "16Gi"), cluster.GPU("r1", 1, t4, "16Gi")},
		"r2": {cluster.GPU("r2", 0, t4, "16Gi"), cluster.GPU("r2", 1, t4, "16Gi")},
	})
	rng := rand.New(rand.NewSource(7))
	wave := func(from, to int) {
		for i := from; i < to; i++ {
			createPod(t, c, vramPod(fmt.Sprintf("s4-%03d", i), int64(1+rng.Intn(3))))
		}
	}
	wave(0, 10)
	settle(t, c, "s4-", 2*time.Minute)

	t.Log("killing the extender (SIGKILL) while creating pods")
	c.KillExtender()
	wave(10, 20)
	if err := c.StartExtender(); err != nil {
		t.Fatal(err)
	}
	t.Log("extender restarted")
	wave(20, 25)

	t.Log("killing r1's device plugin (SIGKILL) and restarting it")
	c.KillPlugin("r1")
	wave(25, 30)
	if err := c.StartPlugin("r1"); err != nil {
		t.Fatal(err)
	}

	t.Log("restarting r2's device manager (kubelet restart: socket re-created, plugin must re-register)")
	r2 := c.Node("r2")
	if err := r2.RestartDeviceManager(); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitNodesAdvertise(c.Context(), []string{"r1", "r2"}, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	wave(30, 40)
	pods := settle(t, c, "s4-", 3*time.Minute)
	used := checkPods(t, c, pods, true)
	running := 0
	for _, p := range pods {
		if p.Status.Phase == "Running" {
			running++
		}
	}
	t.Logf("after restarts: %d of %d pods Running; units per GPU %v", running, len(pods), used)

	// Placement continues: free one running pod whose reservation matches its
	// allocation, and a new pod of its size lands.
	var victim string
	var size int64
	for _, p := range pods {
		if p.Status.Phase != "Running" {
			continue
		}
		if pl := placementOf(t, &p); pl.AnnotatedGPU == pl.EnvGPU && pl.Request > size {
			victim, size = p.Name, pl.Request
		}
	}
	if victim == "" {
		t.Fatal("no pod running after the restarts")
	}
	// Pending pods would compete for the freed room: remove them first.
	for _, p := range pods {
		if p.Status.Phase != "Running" {
			deletePod(t, c, p.Name)
		}
	}
	// The new pod is one unit smaller than the freed room: a same-size swap by the
	// device plugin can fill a GPU past the extender's headroom (all units used), and
	// then exactly the freed size no longer passes the headroom rule.
	if size > 1 {
		size--
	}
	t.Logf("deleted the pending/failed pods; deleting %s; a new %d GiB pod must be placed", victim, size)
	deletePod(t, c, victim)
	createPod(t, c, vramPod("s4-after", size))
	checkRunningPod(t, waitRunning(t, c, "s4-after"))
	pods = settle(t, c, "s4-", 2*time.Minute)
	used = checkPods(t, c, pods, true)
	checkGpuNodesAgree(t, c, used)
	checkGpuNodePods(t, c, "s4-")
}

// Scenario 5: a GPU the fake file marks unhealthy takes no new pods.
func TestScenario5_UnhealthyGPU(t *testing.T) {
	c := newCluster(t, cluster.Options{}, map[string][]cluster.FakeGPU{
		"h1": {cluster.GPU("h1", 0, t4, "16Gi"), cluster.GPU("h1", 1, t4, "16Gi")},
	})
	gpus := c.GPUs("h1")
	gpus[1].Healthy = false
	gpus[1].UnhealthyReason = "XID 79 (fallen off the bus)"
	if err := c.SetGPUs("h1", gpus); err != nil {
		t.Fatal(err)
	}
	until(t, 30*time.Second, "GpuNode h1 to report GPU 1 unhealthy", func() (bool, error) {
		st, err := c.GpuNode(c.Context(), "h1")
		if err != nil {
			return false, err
		}
		for _, g := range st.GPUs {
			if g.UUID == "GPU-h1-1" {
				return !g.Healthy, nil
			}
		}
		return false, nil
	})
	t.Log("GPU-h1-1 marked unhealthy (XID 79)")
	for i := 0; i < 10; i++ {
		createPod(t, c, vramPod(fmt.Sprintf("s5-%02d", i), 3))
	}
	pods := settle(t, c, "s5-", 2*time.Minute)
	used := checkNoOvercommit(t, c, pods)
	if used["GPU-h1-1"] != 0 {
		t.Fatalf("the unhealthy GPU received %d units of pods", used["GPU-h1-1"])
	}
	if used["GPU-h1-0"] == 0 {
		t.Fatal("the healthy GPU received no pods")
	}
	t.Logf("units per GPU: %v (GPU-h1-1 unhealthy)", used)
	// The node still has units the scheduler's own check accepts (the unhealthy
	// GPU's units are not allocatable, the healthy one keeps headroom): a 1 GiB pod
	// reaches the extender, whose verdict must name the unhealthy GPU.
	createPod(t, c, vramPod("s5-probe", 1))
	msg := waitUnschedulable(t, c, "s5-probe")
	if !strings.Contains(msg, "unhealthy") {
		t.Fatalf("s5-probe reason %q does not mention the unhealthy GPU", msg)
	}
	t.Logf("s5-probe (1 GiB) Pending: %s", msg)
}

// Scenario 6: a pod asking for more than any GPU has stays Pending with an
// unresolvable reason.
func TestScenario6_TooLargeStaysPending(t *testing.T) {
	c := newCluster(t, cluster.Options{}, map[string][]cluster.FakeGPU{
		"big":   {cluster.GPU("big", 0, a100, "80Gi")},
		"small": {cluster.GPU("small", 0, l4, "24Gi")},
	})
	createPod(t, c, vramPod("s6-huge", 100))
	msg := waitUnschedulable(t, c, "s6-huge")
	// Either kube-scheduler's own resource check (no node advertises that many units;
	// preemption cannot help) or the extender's unresolvable verdict must say so.
	schedulerVerdict := strings.Contains(msg, "Insufficient "+cluster.ResourceName) && strings.Contains(msg, "Preemption is not helpful")
	if !schedulerVerdict && !strings.Contains(msg, "more than any GPU") {
		t.Fatalf("reason %q does not say the request can never fit", msg)
	}
	if p := getPod(t, c, "s6-huge"); p.Spec.NodeName != "" {
		t.Fatalf("s6-huge was placed on %s", p.Spec.NodeName)
	}
	t.Logf("s6-huge (100 GiB) Pending: %s", msg)
}

// A pod annotated vramslice.io/gpus: "2" spreads its request evenly over two GPUs of one node:
// the extender places it only where two GPUs each have the share, binds both, the device
// plugin's Allocate (through the kubelet's device manager) hands the container one limit per
// GPU, and a second such pod that no longer fits is refused with the per-GPU reason.
func TestScenario7_PodSpanningTwoGPUs(t *testing.T) {
	c := newCluster(t, cluster.Options{}, map[string][]cluster.FakeGPU{
		"tp":  {cluster.GPU("tp", 0, l4, "16Gi"), cluster.GPU("tp", 1, l4, "16Gi")},
		"one": {cluster.GPU("one", 0, a100, "40Gi")},
	})
	spanning := func(p *v1.Pod) { p.Annotations = map[string]string{"vramslice.io/gpus": "2"} }
	createPod(t, c, vramPod("s7-tp2", 16, spanning))
	p := waitRunning(t, c, "s7-tp2")
	if p.Spec.NodeName != "tp" {
		t.Fatalf("s7-tp2 landed on %s, the node with one GPU", p.Spec.NodeName)
	}
	annotated := strings.Split(p.Annotations[cluster.AnnotationGPUUUID], ",")
	sort.Strings(annotated)
	if strings.Join(annotated, ",") != "GPU-tp-0,GPU-tp-1" {
		t.Fatalf("s7-tp2 annotated with GPUs %q, want both GPUs of tp", p.Annotations[cluster.AnnotationGPUUUID])
	}
	env := cluster.ContainerEnv(p, "main")
	limits := map[string]string{}
	for _, entry := range strings.Split(env["VRAMSLICE_VRAM_LIMITS"], ",") {
		uuid, bytes, _ := strings.Cut(entry, ":")
		limits[uuid] = bytes
	}
	share := strconv.FormatInt(8<<30, 10)
	if len(limits) != 2 || limits["GPU-tp-0"] != share || limits["GPU-tp-1"] != share {
		t.Fatalf("s7-tp2: VRAMSLICE_VRAM_LIMITS=%q, want 8 GiB on each of GPU-tp-0 and GPU-tp-1", env["VRAMSLICE_VRAM_LIMITS"])
	}
	visible := strings.Split(env["NVIDIA_VISIBLE_DEVICES"], ",")
	sort.Strings(visible)
	if strings.Join(visible, ",") != "GPU-tp-0,GPU-tp-1" {
		t.Fatalf("s7-tp2 sees GPUs %q", env["NVIDIA_VISIBLE_DEVICES"])
	}
	t.Logf("s7-tp2 (16 GiB over 2 GPUs) on tp: VRAMSLICE_VRAM_LIMITS=%s", env["VRAMSLICE_VRAM_LIMITS"])

	// Each 16 GiB GPU now holds 8 GiB; with the 512 MiB headroom no GPU has another 8 GiB.
	createPod(t, c, vramPod("s7-tp2-more", 16, spanning))
	msg := waitUnschedulable(t, c, "s7-tp2-more")
	if !strings.Contains(msg, "2 GPUs") {
		t.Fatalf("s7-tp2-more refused with %q, which does not name the two GPUs it needs", msg)
	}
	t.Logf("s7-tp2-more Pending: %s", msg)

	// The pod's own mistake (a GPU count that is not a number) makes it unschedulable with the
	// reason, not a scheduler error that kube-scheduler retries at every backoff.
	createPod(t, c, vramPod("s7-bad-count", 16, func(p *v1.Pod) {
		p.Annotations = map[string]string{"vramslice.io/gpus": "many"}
	}))
	msg = waitUnschedulable(t, c, "s7-bad-count")
	if p := getPod(t, c, "s7-bad-count"); !judgedUnschedulable(p) {
		t.Fatalf("s7-bad-count: PodScheduled=False with reason %q (%q), want %s", unschedulable(p).Reason, msg, v1.PodReasonUnschedulable)
	}
	if !strings.Contains(msg, `vramslice.io/gpus="many" is invalid`) {
		t.Fatalf("s7-bad-count refused with %q, which does not name the bad annotation", msg)
	}
	t.Logf("s7-bad-count Pending: %s", msg)
}

// TestScenario8_EveryVRAMContainerOnThePodsGPU: a pod with two VRAM containers gets both on the
// GPU the extender annotated, through the real device manager (it asks the plugin once per
// container, and lists the first container in PodResources before asking for the second).
func TestScenario8_EveryVRAMContainerOnThePodsGPU(t *testing.T) {
	c := newCluster(t, cluster.Options{}, map[string][]cluster.FakeGPU{
		"mc": {cluster.GPU("mc", 0, l4, "16Gi"), cluster.GPU("mc", 1, l4, "16Gi")},
	})
	// A 10 GiB pod on one GPU leaves that GPU the one binpacking prefers for a single 3-unit
	// request, but too short for the 6 GiB pod below.
	createPod(t, c, vramPod("s8-filler", 10))
	filler := waitRunning(t, c, "s8-filler").Annotations[cluster.AnnotationGPUUUID]
	two := vramPod("s8-two", 3)
	two.Spec.Containers = append(two.Spec.Containers, *two.Spec.Containers[0].DeepCopy())
	two.Spec.Containers[0].Name, two.Spec.Containers[1].Name = "a", "b"
	createPod(t, c, two)
	p := waitRunning(t, c, "s8-two")
	annotated := p.Annotations[cluster.AnnotationGPUUUID]
	if annotated == filler {
		t.Fatalf("s8-two (6 GiB) annotated with the filler's GPU %s, which has under 6 GiB free", filler)
	}
	for _, name := range []string{"a", "b"} {
		env := cluster.ContainerEnv(p, name)
		if got := env["NVIDIA_VISIBLE_DEVICES"]; got != annotated {
			t.Fatalf("s8-two container %s got GPU %q, the pod is annotated %s (the filler is on %s)",
				name, got, annotated, filler)
		}
		if got := env["VRAMSLICE_VRAM_LIMIT_BYTES"]; got != strconv.FormatInt(3<<30, 10) {
			t.Fatalf("s8-two container %s: VRAMSLICE_VRAM_LIMIT_BYTES=%q, want 3 GiB", name, got)
		}
	}
	t.Logf("s8-two: containers a and b both on %s (filler on %s)", annotated, filler)
}

// TestScenario10_SameSizePodsKeepTheirShapes: a one-GPU pod and a pod spanning two GPUs that
// ask for the same number of units, created together on one node. The device plugin matches
// the kubelet's requests by size, so it could hand each the other's shape; the extender places
// the second only once the first has its units. Each ends up with its own shape: one GPU with
// the whole limit, and two GPUs with half each.
func TestScenario10_SameSizePodsKeepTheirShapes(t *testing.T) {
	c := newCluster(t, cluster.Options{}, map[string][]cluster.FakeGPU{
		"mix": {cluster.GPU("mix", 0, l4, "16Gi"), cluster.GPU("mix", 1, l4, "16Gi")},
	})
	spanning := func(p *v1.Pod) { p.Annotations = map[string]string{"vramslice.io/gpus": "2"} }
	createPod(t, c, vramPod("s10-single", 8))
	createPod(t, c, vramPod("s10-tp2", 8, spanning))
	single := waitRunning(t, c, "s10-single")
	tp := waitRunning(t, c, "s10-tp2")

	env := cluster.ContainerEnv(single, "main")
	if got := strings.Split(env["NVIDIA_VISIBLE_DEVICES"], ","); len(got) != 1 {
		t.Fatalf("s10-single (8 GiB on one GPU) sees GPUs %q", env["NVIDIA_VISIBLE_DEVICES"])
	}
	if got := env["VRAMSLICE_VRAM_LIMIT_BYTES"]; got != strconv.FormatInt(8<<30, 10) {
		t.Fatalf("s10-single: VRAMSLICE_VRAM_LIMIT_BYTES=%q, want 8 GiB", got)
	}
	env = cluster.ContainerEnv(tp, "main")
	visible := strings.Split(env["NVIDIA_VISIBLE_DEVICES"], ",")
	sort.Strings(visible)
	if strings.Join(visible, ",") != "GPU-mix-0,GPU-mix-1" {
		t.Fatalf("s10-tp2 (8 GiB over 2 GPUs) sees GPUs %q", env["NVIDIA_VISIBLE_DEVICES"])
	}
	share := strconv.FormatInt(4<<30, 10)
	if got := env["VRAMSLICE_VRAM_LIMIT_BYTES"]; got != strconv.FormatInt(8<<30, 10) {
		t.Fatalf("s10-tp2: VRAMSLICE_VRAM_LIMIT_BYTES=%q, want its 8 units' 8 GiB", got)
	}
	for _, entry := range strings.Split(env["VRAMSLICE_VRAM_LIMITS"], ",") {
		if _, bytes, _ := strings.Cut(entry, ":"); bytes != share {
			t.Fatalf("s10-tp2: VRAMSLICE_VRAM_LIMITS=%q, want 4 GiB on each GPU", env["VRAMSLICE_VRAM_LIMITS"])
		}
	}
	t.Logf("s10-single on %s; s10-tp2 on %s (%s)", single.Annotations[cluster.AnnotationGPUUUID],
		tp.Annotations[cluster.AnnotationGPUUUID], env["VRAMSLICE_VRAM_LIMITS"])
	// Whether s10-tp2 had to wait depends on how fast the kubelet allocated s10-single: logged,
	// not asserted.
	t.Logf("s10-tp2 events: %q", podEvents(t, c, "s10-tp2"))
}
