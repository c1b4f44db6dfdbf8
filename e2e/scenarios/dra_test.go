package scenarios

// DRA mode: the node agent runs with `mode: dra` against hollow nodes that run the kubelet's
// real DRA manager (pkg/kubelet/cm/dra) and plugin manager (pkg/kubelet/pluginmanager), and
// pods are placed by kube-scheduler's DynamicResources plugin (profile plain-scheduler, no
// extender) from the agent's ResourceSlice and the chart's DeviceClass vram.vramslice.io.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vramslice/vramslice/e2e/cluster"
)

const gib = int64(1) << 30

// newDRACluster starts a cluster for DRA (chart RBAC of mode=dra, the DeviceClass, a
// kube-scheduler without the extender) with the given DRA nodes, and waits until every
// node's ResourceSlice lists all its GPUs.
func newDRACluster(t *testing.T, nodes map[string][]cluster.FakeGPU) *cluster.Cluster {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithCancel(context.Background())
	c, err := cluster.Start(ctx, cluster.Options{DRA: true, PlainScheduler: true})
	if err != nil {
		cancel()
		t.Fatalf("starting the cluster: %v", err)
	}
	t.Cleanup(func() {
		checkNoForbidden(t, c)
		if t.Failed() {
			dumpLogs(t, c)
		}
		c.Stop()
		cancel()
	})
	names := make([]string, 0, len(nodes))
	for name := range nodes {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if _, err := c.AddDRANode(name, nodes[name]); err != nil {
			t.Fatalf("adding DRA node %s: %v", name, err)
		}
	}
	for _, name := range names {
		n := c.Node(name)
		until(t, 60*time.Second, "ResourceSlice of "+name, func() (bool, error) {
			if exited, perr := n.Plugin.Exited(); exited {
				t.Fatalf("node agent of %s exited (%v); log tail:\n%s", name, perr, n.Plugin.Tail(3000))
			}
			s, err := getSlice(c, name)
			if err != nil {
				return false, err
			}
			return len(s.Spec.Devices) == len(nodes[name]), nil
		})
	}
	if err := c.WaitDRARegistered(names, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		// The kubelet's DRA manager confirmed the registration: the agent says so (its
		// NotifyRegistrationStatus may land just after the manager lists the driver).
		url := c.Node(name).MetricsURL + "/metrics"
		until(t, 10*time.Second, "vramslice_plugin_registered 1 on "+name, func() (bool, error) {
			registered := checkMetricsFormat(t, url, "vramslice_backend_errors_total")["vramslice_plugin_registered"]
			return registered != nil && len(registered.GetMetric()) == 1 && registered.GetMetric()[0].GetGauge().GetValue() == 1, nil
		})
	}
	t.Logf("DRA cluster up in %s: node(s) %v, each with its ResourceSlice and the driver registered", time.Since(start).Round(100*time.Millisecond), names)
	return c
}

func getSlice(c *cluster.Cluster, node string) (*resourcev1.ResourceSlice, error) {
	return c.Client.ResourceV1().ResourceSlices().Get(c.Context(), node+"-"+cluster.DRADriver, metav1.GetOptions{})
}

// sliceMemory is the published `memory` capacity of each device of a node's slice.
func sliceMemory(t *testing.T, c *cluster.Cluster, node string) map[string]int64 {
	t.Helper()
	s, err := getSlice(c, node)
	if err != nil {
		t.Fatalf("ResourceSlice of %s: %v", node, err)
	}
	out := map[string]int64{}
	for _, d := range s.Spec.Devices {
		q := d.Capacity["memory"].Value
		out[d.Name] = q.Value()
	}
	return out
}

// waitSliceDevices waits until node's ResourceSlice lists `devices` devices (the agent
// publishes it again after a kubelet's DRA manager wiped it).
func waitSliceDevices(t *testing.T, c *cluster.Cluster, node string, devices int, timeout time.Duration, when string) {
	t.Helper()
	until(t, timeout, "the ResourceSlice of "+node+" "+when, func() (bool, error) {
		s, err := getSlice(c, node)
		return err == nil && len(s.Spec.Devices) == devices, err
	})
}

// vramClaim is a ResourceClaim for count GPUs with gibEach GiB of memory on each.
func vramClaim(name string, gibEach int64, count int64) *resourcev1.ResourceClaim {
	return &resourcev1.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{Requests: []resourcev1.DeviceRequest{{
			Name: "vram",
			Exactly: &resourcev1.ExactDeviceRequest{
				DeviceClassName: cluster.DRADeviceClass,
				AllocationMode:  resourcev1.DeviceAllocationModeExactCount,
				Count:           count,
				Capacity: &resourcev1.CapacityRequirements{Requests: map[resourcev1.QualifiedName]resource.Quantity{
					"memory": *resource.NewQuantity(gibEach*gib, resource.BinarySI),
				}},
			},
		}}}},
	}
}

// claimPod is a pod (scheduled by kube-scheduler without the extender) whose container uses claim.
func claimPod(name, claim string) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: v1.PodSpec{
			SchedulerName:  cluster.PlainScheduler,
			ResourceClaims: []v1.PodResourceClaim{{Name: "vram", ResourceClaimName: &claim}},
			Containers: []v1.Container{{
				Name: "main", Image: "registry.k8s.io/pause:3.10",
				Resources: v1.ResourceRequirements{Claims: []v1.ResourceClaim{{Name: "vram"}}},
			}},
		},
	}
}

// createClaimAndPod creates a claim of count×gibEach GiB (its devices also chosen by the CEL
// selectors, if any) and a pod using it.
func createClaimAndPod(t *testing.T, c *cluster.Cluster, name string, gibEach, count int64, selectors ...string) {
	t.Helper()
	claim := vramClaim(name, gibEach, count)
	for _, expr := range selectors {
		claim.Spec.Devices.Requests[0].Exactly.Selectors = append(claim.Spec.Devices.Requests[0].Exactly.Selectors,
			resourcev1.DeviceSelector{CEL: &resourcev1.CELDeviceSelector{Expression: expr}})
	}
	if _, err := c.Client.ResourceV1().ResourceClaims(ns).Create(c.Context(), claim, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating claim %s: %v", name, err)
	}
	createPod(t, c, claimPod(name, name))
}

// checkSliceAttributes checks the attributes a CEL selector can use on every device of a
// node's slice: uuid, model, index, healthy, and the driver's version as a semantic version.
func checkSliceAttributes(t *testing.T, c *cluster.Cluster, node string, gpus []cluster.FakeGPU) {
	t.Helper()
	s, err := getSlice(c, node)
	if err != nil {
		t.Fatalf("ResourceSlice of %s: %v", node, err)
	}
	byName := map[string]resourcev1.Device{}
	for _, d := range s.Spec.Devices {
		byName[d.Name] = d
	}
	for _, g := range gpus {
		d, ok := byName[fmt.Sprintf("gpu-%d", g.Index)]
		if !ok {
			t.Fatalf("slice of %s has no device gpu-%d: %v", node, g.Index, s.Spec.Devices)
		}
		a := d.Attributes
		str := func(name string) string {
			if v := a[resourcev1.QualifiedName(name)].StringValue; v != nil {
				return *v
			}
			return "<none>"
		}
		version := "<none>"
		if v := a["driverVersion"].VersionValue; v != nil {
			version = *v
		}
		idx := a["index"].IntValue
		healthy := a["healthy"].BoolValue
		if str("uuid") != g.UUID || str("model") != g.Model || idx == nil || *idx != int64(g.Index) ||
			healthy == nil || !*healthy || version != "580.65.6" {
			t.Errorf("%s/%s attributes %+v, want uuid %s, model %q, index %d, healthy, driverVersion 580.65.6 (from %s)",
				node, d.Name, a, g.UUID, g.Model, g.Index, cluster.FakeDriverVersion)
		}
	}
}

// Selectors over the published attributes: the driver's version compared as a version.
const (
	driverAtLeast550 = `device.attributes["vramslice.io"].driverVersion.compareTo(semver("550.0.0")) >= 0`
	driverAtLeast999 = `device.attributes["vramslice.io"].driverVersion.compareTo(semver("999.0.0")) >= 0`
)

func getClaim(t *testing.T, c *cluster.Cluster, name string) *resourcev1.ResourceClaim {
	t.Helper()
	cl, err := c.Client.ResourceV1().ResourceClaims(ns).Get(c.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("claim %s: %v", name, err)
	}
	return cl
}

// allocatedDevices returns "pool/device" of each allocation result of a claim, checking
// the driver and the consumed memory.
func allocatedDevices(t *testing.T, cl *resourcev1.ResourceClaim, wantBytes int64) []string {
	t.Helper()
	if cl.Status.Allocation == nil {
		t.Fatalf("claim %s is not allocated", cl.Name)
	}
	var out []string
	for _, r := range cl.Status.Allocation.Devices.Results {
		if r.Driver != cluster.DRADriver {
			t.Errorf("claim %s: result driver %q, want %q", cl.Name, r.Driver, cluster.DRADriver)
		}
		if r.ShareID == nil {
			t.Errorf("claim %s: result %s/%s has no shareID (a shared device's allocation has one)", cl.Name, r.Pool, r.Device)
		}
		got := r.ConsumedCapacity["memory"]
		if got.Value() != wantBytes {
			t.Errorf("claim %s: consumed memory on %s/%s is %s, want %d bytes", cl.Name, r.Pool, r.Device, got.String(), wantBytes)
		}
		out = append(out, r.Pool+"/"+r.Device)
	}
	return out
}

// cdiSpec reads the CDI spec the agent wrote for a claim and returns its env.
func cdiSpec(t *testing.T, n *cluster.Node, cl *resourcev1.ResourceClaim) []string {
	t.Helper()
	path := filepath.Join(n.CDIDir(), "vramslice.io-claim-"+string(cl.UID)+".json")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("CDI spec of claim %s: %v", cl.Name, err)
	}
	var spec struct {
		Kind    string `json:"kind"`
		Devices []struct {
			Name           string `json:"name"`
			ContainerEdits struct {
				Env []string `json:"env"`
			} `json:"containerEdits"`
		} `json:"devices"`
	}
	if err := json.Unmarshal(data, &spec); err != nil {
		t.Fatalf("CDI spec %s: %v", path, err)
	}
	if spec.Kind != "vramslice.io/claim" || len(spec.Devices) != 1 || spec.Devices[0].Name != string(cl.UID) {
		t.Fatalf("CDI spec %s: kind %q devices %+v, want kind vramslice.io/claim with one device named %s", path, spec.Kind, spec.Devices, cl.UID)
	}
	return spec.Devices[0].ContainerEdits.Env
}

func hasEnv(env []string, kv string) bool {
	for _, e := range env {
		if e == kv {
			return true
		}
	}
	return false
}

// cdiDevicesOf is what the hollow node recorded as the container's CDI devices (from the
// DRA manager's GetResources).
func cdiDevicesOf(t *testing.T, p *v1.Pod) []string {
	t.Helper()
	var ro cluster.PodRunOptions
	if err := json.Unmarshal([]byte(p.Annotations[cluster.RunOptionsAnnotation]), &ro); err != nil {
		t.Fatalf("pod %s: run options: %v", p.Name, err)
	}
	return ro["main"].CDIDevices
}

// TestDRA1_TwoClaimsShareOneGPU: the slice's device carries the attributes CEL can select on;
// two 6 GiB claims (the second also selecting by driver version and model) on a node with one
// 16 GiB GPU are both allocated on gpu-0 (a device that allows multiple allocations), both pods run, the kubelet's
// DRA manager got the agent's CDI device for each, each claim's CDI spec carries the 6 GiB
// limit; a third 6 GiB claim does not fit the 15 GiB published (16 GiB less 512 MiB headroom,
// in whole GiB) and stays Pending; deleting one pod unprepares its claim (CDI spec removed).
func TestDRA1_TwoClaimsShareOneGPU(t *testing.T) {
	c := newDRACluster(t, map[string][]cluster.FakeGPU{"one": {cluster.GPU("one", 0, l4, "16Gi")}})
	if got := sliceMemory(t, c, "one"); got["gpu-0"] != 15*gib {
		t.Fatalf("published memory of one/gpu-0 = %d, want %d (16 GiB - %s headroom, whole GiB)", got["gpu-0"], 15*gib, cluster.DRAHeadroom)
	}
	checkSliceAttributes(t, c, "one", []cluster.FakeGPU{cluster.GPU("one", 0, l4, "16Gi")})
	n := c.Node("one")
	createClaimAndPod(t, c, "dra1-a", 6, 1)
	// The second claim also selects by the published attributes (CEL in the scheduler).
	createClaimAndPod(t, c, "dra1-b", 6, 1, driverAtLeast550, `device.attributes["vramslice.io"].model == "`+l4+`"`)
	for _, name := range []string{"dra1-a", "dra1-b"} {
		p := waitRunning(t, c, name)
		cl := getClaim(t, c, name)
		devs := allocatedDevices(t, cl, 6*gib)
		if len(devs) != 1 || devs[0] != "one/gpu-0" {
			t.Fatalf("claim %s allocated %v, want [one/gpu-0]", name, devs)
		}
		reserved := false
		for _, r := range cl.Status.ReservedFor {
			reserved = reserved || r.UID == p.UID
		}
		if !reserved {
			t.Errorf("claim %s is not reserved for pod %s: %+v", name, p.UID, cl.Status.ReservedFor)
		}
		wantCDI := "vramslice.io/claim=" + string(cl.UID)
		if cdi := cdiDevicesOf(t, p); len(cdi) == 0 || cdi[0] != wantCDI {
			t.Errorf("pod %s: the DRA manager's CDI devices %v, want first %s", name, cdi, wantCDI)
		}
		env := cdiSpec(t, n, cl)
		if !hasEnv(env, "VRAMSLICE_VRAM_LIMIT_BYTES=6442450944") {
			t.Errorf("claim %s CDI env %v lacks VRAMSLICE_VRAM_LIMIT_BYTES=6442450944", name, env)
		}
		if !hasEnv(env, "VRAMSLICE_GPU_UUID=GPU-one-0") {
			t.Errorf("claim %s CDI env %v lacks VRAMSLICE_GPU_UUID=GPU-one-0", name, env)
		}
		t.Logf("%s: claim on %v, pod Running with CDI %v, spec env %v", name, devs, cdiDevicesOf(t, p), env)
	}

	// 12 of 15 GiB are allocated: a third 6 GiB claim fits nowhere.
	createClaimAndPod(t, c, "dra1-c", 6, 1)
	msg := waitUnschedulable(t, c, "dra1-c")
	t.Logf("dra1-c (6 GiB, 3 left on gpu-0) Pending: %s", msg)
	if !strings.Contains(msg, "cannot allocate all claims") {
		t.Fatalf("dra1-c's PodScheduled message %q does not say \"cannot allocate all claims\"", msg)
	}

	// Deleting a pod: the hollow node calls UnprepareResources, the agent removes the spec.
	a := getClaim(t, c, "dra1-a")
	deletePod(t, c, "dra1-a")
	spec := filepath.Join(n.CDIDir(), "vramslice.io-claim-"+string(a.UID)+".json")
	until(t, 30*time.Second, "the CDI spec of dra1-a to be removed after its pod went", func() (bool, error) {
		_, err := os.Stat(spec)
		return os.IsNotExist(err), nil
	})
	t.Logf("dra1-a's pod deleted: claim unprepared, %s removed", filepath.Base(spec))
}

// TestDRA2_TooLargeClaimStaysPending: a 100 GiB claim against a node with 16 and 24 GiB GPUs
// is allocated nowhere; the pod stays Pending with kube-scheduler's DynamicResources reason.
// So does a 1 GiB claim whose CEL selector asks for a newer driver than the node publishes.
func TestDRA2_TooLargeClaimStaysPending(t *testing.T) {
	c := newDRACluster(t, map[string][]cluster.FakeGPU{"mixed": {
		cluster.GPU("mixed", 0, l4, "16Gi"), cluster.GPU("mixed", 1, l4, "24Gi"),
	}})
	createClaimAndPod(t, c, "dra2-100g", 100, 1)
	// A claim that fits by memory but whose selector no device meets stays Pending too.
	createClaimAndPod(t, c, "dra2-newer-driver", 1, 1, driverAtLeast999)
	msg := waitUnschedulable(t, c, "dra2-100g")
	if m := waitUnschedulable(t, c, "dra2-newer-driver"); !strings.Contains(m, "cannot allocate all claims") {
		t.Errorf("dra2-newer-driver (selector driverVersion >= 999.0.0) Pending with %q, want \"cannot allocate all claims\"", m)
	}
	var events []string
	until(t, 30*time.Second, "a FailedScheduling event for dra2-100g", func() (bool, error) {
		events = podEvents(t, c, "dra2-100g")
		for _, e := range events {
			if strings.HasPrefix(e, "FailedScheduling: ") {
				return true, nil
			}
		}
		return false, nil
	})
	t.Logf("dra2-100g Pending: condition %q; events %q", msg, events)
	const want = "cannot allocate all claims"
	found := false
	for _, e := range events {
		found = found || (strings.HasPrefix(e, "FailedScheduling: ") && strings.Contains(e, want))
	}
	if !found {
		t.Fatalf("no FailedScheduling event of dra2-100g says %q: %q", want, events)
	}
	if cl := getClaim(t, c, "dra2-100g"); cl.Status.Allocation != nil {
		t.Fatalf("claim dra2-100g was allocated: %+v", cl.Status.Allocation)
	}
	if p := getPod(t, c, "dra2-100g"); p.Spec.NodeName != "" {
		t.Fatalf("dra2-100g was bound to %s", p.Spec.NodeName)
	}
}

// TestDRA3_OutsideProcessShrinksPublishedCapacity: 10 GiB used on GPU 0 by a process of no
// claim (the fake backend's file) shrinks gpu-0's published memory from 15 to 5 GiB
// (16 − 10 − 0.5 headroom, whole GiB) while gpu-1 keeps 15 GiB; an 8 GiB claim, which both
// GPUs could take before, is allocated on gpu-1.
func TestDRA3_OutsideProcessShrinksPublishedCapacity(t *testing.T) {
	c := newDRACluster(t, map[string][]cluster.FakeGPU{"two": {
		cluster.GPU("two", 0, l4, "16Gi"), cluster.GPU("two", 1, l4, "16Gi"),
	}})
	if got := sliceMemory(t, c, "two"); got["gpu-0"] != 15*gib || got["gpu-1"] != 15*gib {
		t.Fatalf("published memory %v, want 15 GiB (%d) on gpu-0 and gpu-1", got, 15*gib)
	}
	gpus := c.GPUs("two")
	gpus[0].Used = "10Gi"
	gpus[0].Processes = []cluster.FakeGPUProcess{{PID: 4242, Used: "10Gi"}}
	if err := c.SetGPUs("two", gpus); err != nil {
		t.Fatal(err)
	}
	var got map[string]int64
	until(t, 30*time.Second, "gpu-0's published memory to shrink to 5 GiB", func() (bool, error) {
		got = sliceMemory(t, c, "two")
		return got["gpu-0"] == 5*gib, nil
	})
	if got["gpu-1"] != 15*gib {
		t.Fatalf("gpu-1's published memory is %d, want %d (nothing runs there)", got["gpu-1"], 15*gib)
	}
	t.Logf("10 GiB outside any claim on GPU 0: slice memory gpu-0 %d GiB, gpu-1 %d GiB", got["gpu-0"]/gib, got["gpu-1"]/gib)

	createClaimAndPod(t, c, "dra3-8g", 8, 1)
	waitRunning(t, c, "dra3-8g")
	devs := allocatedDevices(t, getClaim(t, c, "dra3-8g"), 8*gib)
	if len(devs) != 1 || devs[0] != "two/gpu-1" {
		t.Fatalf("claim dra3-8g allocated %v, want [two/gpu-1] (gpu-0 has 5 GiB claimable)", devs)
	}
	env := cdiSpec(t, c.Node("two"), getClaim(t, c, "dra3-8g"))
	if !hasEnv(env, "VRAMSLICE_GPU_UUID=GPU-two-1") {
		t.Fatalf("dra3-8g's CDI env %v lacks VRAMSLICE_GPU_UUID=GPU-two-1", env)
	}
	t.Logf("dra3-8g (8 GiB) -> %v", devs)

	// count: 2 of 4 GiB: one per GPU (gpu-0 still has 5 GiB claimable, gpu-1 7 GiB), and the
	// claim's limit file lists both GPUs.
	createClaimAndPod(t, c, "dra3-2x4g", 4, 2)
	waitRunning(t, c, "dra3-2x4g")
	cl := getClaim(t, c, "dra3-2x4g")
	devs = allocatedDevices(t, cl, 4*gib)
	sort.Strings(devs)
	if len(devs) != 2 || devs[0] != "two/gpu-0" || devs[1] != "two/gpu-1" {
		t.Fatalf("count-2 claim dra3-2x4g allocated %v, want [two/gpu-0 two/gpu-1]", devs)
	}
	limit := readLimitFile(t, c.Node("two"), cl)
	if !strings.HasPrefix(limit, "limits=") || !strings.Contains(limit, "GPU-two-0") || !strings.Contains(limit, "GPU-two-1") {
		t.Fatalf("dra3-2x4g's limit file %q is not a limits= line naming GPU-two-0 and GPU-two-1", limit)
	}
	t.Logf("dra3-2x4g (count 2 × 4 GiB) -> %v, limit file %q", devs, strings.TrimSpace(limit))
}

// readLimitFile reads the host file the claim's CDI spec mounts at /var/run/vramslice/limit.
func readLimitFile(t *testing.T, n *cluster.Node, cl *resourcev1.ResourceClaim) string {
	t.Helper()
	path := filepath.Join(n.CDIDir(), "vramslice.io-claim-"+string(cl.UID)+".json")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("CDI spec of claim %s: %v", cl.Name, err)
	}
	var spec struct {
		Devices []struct {
			ContainerEdits struct {
				Mounts []struct {
					HostPath      string `json:"hostPath"`
					ContainerPath string `json:"containerPath"`
				} `json:"mounts"`
			} `json:"containerEdits"`
		} `json:"devices"`
	}
	if err := json.Unmarshal(data, &spec); err != nil || len(spec.Devices) != 1 {
		t.Fatalf("CDI spec %s: %v (%d devices)", path, err, len(spec.Devices))
	}
	for _, m := range spec.Devices[0].ContainerEdits.Mounts {
		if m.ContainerPath == "/var/run/vramslice/limit" {
			text, err := os.ReadFile(m.HostPath)
			if err != nil {
				t.Fatalf("limit file of claim %s: %v", cl.Name, err)
			}
			return string(text)
		}
	}
	t.Fatalf("CDI spec %s mounts no /var/run/vramslice/limit: %+v", path, spec.Devices[0].ContainerEdits.Mounts)
	return ""
}

// TestDRA4_Restarts: a kubelet restart (new DRA manager on the same state directory) and a
// node agent restart (SIGKILL, same checkpoint) lose no prepared claim: preparing the running
// pod again returns the same CDI device, and the agent answers a prepare from a DRA manager
// that lost its own state with the same CDI device (its checkpoint); new claims are still
// allocated and prepared afterwards, and deleting a pod still unprepares its claim.
func TestDRA4_Restarts(t *testing.T) {
	c := newDRACluster(t, map[string][]cluster.FakeGPU{"rs": {cluster.GPU("rs", 0, l4, "16Gi")}})
	n := c.Node("rs")
	createClaimAndPod(t, c, "dra4-a", 4, 1)
	p := waitRunning(t, c, "dra4-a")
	cl := getClaim(t, c, "dra4-a")
	want := "vramslice.io/claim=" + string(cl.UID)
	// PrepareResources needs the driver registered with the new DRA manager first (its
	// registration takes one poll of the registry directory), as after a real kubelet restart.
	prepare := func(when string) {
		t.Helper()
		var got map[string][]string
		until(t, 30*time.Second, when+": PrepareResources of dra4-a", func() (bool, error) {
			var err error
			if got, err = n.PrepareClaims(c.Context(), p); err != nil {
				return false, err
			}
			if len(got["main"]) == 0 || got["main"][0] != want {
				return false, fmt.Errorf("CDI devices %v, want first %s", got, want)
			}
			return true, nil
		})
		t.Logf("%s: dra4-a prepared again with CDI %v", when, got["main"])
	}

	if err := n.RestartDRAManager(c.Context()); err != nil {
		t.Fatal(err)
	}
	prepare("after a kubelet restart (DRA manager checkpoint)")
	// The restarted DRA manager deleted the node's ResourceSlices at its start; the agent,
	// registered again, must publish its slice again.
	waitSliceDevices(t, c, "rs", 1, 15*time.Second, "after the kubelet restart")

	c.KillPlugin("rs")
	if err := c.StartPlugin("rs"); err != nil {
		t.Fatal(err)
	}
	// A DRA manager without its state calls the agent's NodePrepareResources again.
	n.StopDRAForTest()
	if err := os.RemoveAll(n.DRAStateDir()); err != nil {
		t.Fatal(err)
	}
	if err := n.RestartDRAManager(c.Context()); err != nil {
		t.Fatal(err)
	}
	prepare("after an agent restart, by a DRA manager without state (agent checkpoint)")

	// The node still takes claims: the ResourceSlice must be back after the restarts.
	waitSliceDevices(t, c, "rs", 1, 30*time.Second, "after the restarts")
	createClaimAndPod(t, c, "dra4-b", 4, 1)
	waitRunning(t, c, "dra4-b")
	if devs := allocatedDevices(t, getClaim(t, c, "dra4-b"), 4*gib); len(devs) != 1 || devs[0] != "rs/gpu-0" {
		t.Fatalf("dra4-b allocated %v, want [rs/gpu-0]", devs)
	}
	deletePod(t, c, "dra4-a")
	spec := filepath.Join(n.CDIDir(), "vramslice.io-claim-"+string(cl.UID)+".json")
	until(t, 30*time.Second, "dra4-a's CDI spec to be removed", func() (bool, error) {
		_, err := os.Stat(spec)
		return os.IsNotExist(err), nil
	})
	t.Logf("after the restarts: dra4-b Running on rs/gpu-0, dra4-a deleted and unprepared")
}

// TestDRA5_UnhealthyGPUIsTainted: a GPU that falls unhealthy (XID 79 in the fake backend) stays
// in the slice with a NoSchedule device taint vramslice.io/unhealthy, `healthy: false` and its
// reason; the claim already on it keeps its pod Running, kube-scheduler allocates no new claim
// on it (an 8 GiB claim that only the tainted GPU has room for stays Pending), and when the GPU
// is healthy again the taint goes and that claim is allocated there.
func TestDRA5_UnhealthyGPUIsTainted(t *testing.T) {
	c := newDRACluster(t, map[string][]cluster.FakeGPU{"sick": {
		cluster.GPU("sick", 0, l4, "16Gi"), cluster.GPU("sick", 1, l4, "16Gi"),
	}})
	createClaimAndPod(t, c, "dra5-a", 6, 1)
	waitRunning(t, c, "dra5-a")
	if devs := allocatedDevices(t, getClaim(t, c, "dra5-a"), 6*gib); len(devs) != 1 || devs[0] != "sick/gpu-0" {
		t.Fatalf("dra5-a allocated %v, want [sick/gpu-0] (the first device with room)", devs)
	}

	setHealth := func(healthy bool) {
		gpus := c.GPUs("sick")
		gpus[0].Healthy = healthy
		gpus[0].UnhealthyReason = ""
		if !healthy {
			gpus[0].UnhealthyReason = "XID 79"
		}
		if err := c.SetGPUs("sick", gpus); err != nil {
			t.Fatal(err)
		}
	}
	gpu0 := func() resourcev1.Device {
		s, err := getSlice(c, "sick")
		if err != nil {
			t.Fatalf("ResourceSlice of sick: %v", err)
		}
		for _, d := range s.Spec.Devices {
			if d.Name == "gpu-0" {
				return d
			}
		}
		t.Fatalf("the slice of sick lists no gpu-0: %+v", s.Spec.Devices)
		return resourcev1.Device{}
	}
	setHealth(false)
	until(t, 30*time.Second, "gpu-0 to be tainted vramslice.io/unhealthy", func() (bool, error) {
		d := gpu0()
		return len(d.Taints) == 1 && d.Taints[0].Key == "vramslice.io/unhealthy" &&
			d.Taints[0].Effect == resourcev1.DeviceTaintEffectNoSchedule, nil
	})
	d := gpu0()
	if h := d.Attributes["healthy"].BoolValue; h == nil || *h {
		t.Errorf("tainted gpu-0 has healthy %v, want false", h)
	}
	if r := d.Attributes["unhealthyReason"].StringValue; r == nil || *r != "XID 79" {
		t.Errorf("tainted gpu-0 has unhealthyReason %v, want XID 79", r)
	}
	t.Logf("gpu-0 unhealthy: still listed, taints %+v", d.Taints)

	// gpu-1 takes 10 GiB (5 left); 8 GiB fits only on the tainted gpu-0 (9 left there).
	createClaimAndPod(t, c, "dra5-b", 10, 1)
	waitRunning(t, c, "dra5-b")
	if devs := allocatedDevices(t, getClaim(t, c, "dra5-b"), 10*gib); len(devs) != 1 || devs[0] != "sick/gpu-1" {
		t.Fatalf("dra5-b allocated %v, want [sick/gpu-1] (gpu-0 is tainted)", devs)
	}
	createClaimAndPod(t, c, "dra5-c", 8, 1)
	if msg := waitUnschedulable(t, c, "dra5-c"); !strings.Contains(msg, "cannot allocate all claims") {
		t.Fatalf("dra5-c Pending with %q, want \"cannot allocate all claims\"", msg)
	}
	if p := getPod(t, c, "dra5-a"); p.Status.Phase != v1.PodRunning {
		t.Fatalf("dra5-a, on the GPU that fell unhealthy, is %s, want Running", p.Status.Phase)
	}
	t.Logf("dra5-c (8 GiB, room only on tainted gpu-0) Pending; dra5-a still Running on gpu-0")

	setHealth(true)
	until(t, 30*time.Second, "gpu-0's taint to be removed", func() (bool, error) {
		return len(gpu0().Taints) == 0, nil
	})
	waitRunning(t, c, "dra5-c")
	if devs := allocatedDevices(t, getClaim(t, c, "dra5-c"), 8*gib); len(devs) != 1 || devs[0] != "sick/gpu-0" {
		t.Fatalf("dra5-c allocated %v after gpu-0 recovered, want [sick/gpu-0]", devs)
	}
	t.Logf("gpu-0 healthy again: taint removed, dra5-c Running on sick/gpu-0")
}

// TestDRA6_NearlyFullGPUKeepsTheSliceValid: the API server refuses a whole ResourceSlice when
// one device's request policy does not fit its capacity (min, or min plus one step, above it).
// A GPU an outside process nearly fills publishes one step of room without a step in its
// range, then (less than a step left) is left out, while the other GPU's changes keep being
// written and claims still land there.
func TestDRA6_NearlyFullGPUKeepsTheSliceValid(t *testing.T) {
	c := newDRACluster(t, map[string][]cluster.FakeGPU{"full": {
		cluster.GPU("full", 0, l4, "16Gi"), cluster.GPU("full", 1, l4, "16Gi"),
	}})
	outside := func(gpu0, gpu1 string) {
		t.Helper()
		gpus := c.GPUs("full")
		for i, used := range []string{gpu0, gpu1} {
			gpus[i].Used = used
			gpus[i].Processes = []cluster.FakeGPUProcess{{PID: 5000 + i, Used: used}}
		}
		if err := c.SetGPUs("full", gpus); err != nil {
			t.Fatal(err)
		}
	}
	// 16 GiB − 14 GiB used − 512 MiB headroom: one step (1 GiB) of room on gpu-0.
	outside("14Gi", "4Gi")
	until(t, 30*time.Second, "gpu-1's published memory to become 11 GiB (the slice written)", func() (bool, error) {
		return sliceMemory(t, c, "full")["gpu-1"] == 11*gib, nil
	})
	s, err := getSlice(c, "full")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range s.Spec.Devices {
		if d.Name != "gpu-0" {
			continue
		}
		memory := d.Capacity["memory"]
		if memory.Value.Value() != gib || memory.RequestPolicy == nil || memory.RequestPolicy.ValidRange == nil || memory.RequestPolicy.ValidRange.Step != nil {
			t.Fatalf("gpu-0 publishes %v with policy %+v, want 1 GiB and a range without a step", memory.Value.String(), memory.RequestPolicy)
		}
	}
	t.Logf("gpu-0 with one step of room: published 1 GiB, range without a step; gpu-1 11 GiB")

	// Less than a step of room on gpu-0: left out of the slice.
	outside("15Gi", "6Gi")
	until(t, 30*time.Second, "gpu-1's published memory to become 9 GiB (the slice written)", func() (bool, error) {
		return sliceMemory(t, c, "full")["gpu-1"] == 9*gib, nil
	})
	if got := sliceMemory(t, c, "full"); len(got) != 1 {
		t.Fatalf("published devices %v, want gpu-1 alone (gpu-0 has less than a step of room)", got)
	}
	createClaimAndPod(t, c, "dra6-2g", 2, 1)
	waitRunning(t, c, "dra6-2g")
	if devs := allocatedDevices(t, getClaim(t, c, "dra6-2g"), 2*gib); len(devs) != 1 || devs[0] != "full/gpu-1" {
		t.Fatalf("dra6-2g allocated %v, want [full/gpu-1]", devs)
	}
	t.Logf("gpu-0 with 512 MiB of room: left out; dra6-2g Running on full/gpu-1")
}
