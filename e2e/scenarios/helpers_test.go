package scenarios

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/vramslice/vramslice/e2e/cluster"
)

const ns = "default"

// TestMain refuses to run without our binaries: the e2e must fail, never skip.
func TestMain(m *testing.M) {
	root, err := cluster.FindRepoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	bin := os.Getenv("VRAMSLICE_BIN_DIR")
	if bin == "" {
		bin = root + "/target/debug"
	}
	for _, b := range []string{"vramslice-device-plugin", "vramslice-extender"} {
		if _, err := os.Stat(bin + "/" + b); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: FAIL: %s/%s is missing; build it first (cargo build -p vramslice-device-plugin -p vramslice-extender, or make e2e)\n", bin, b)
			os.Exit(1)
		}
	}
	os.Exit(m.Run())
}

// newCluster starts a cluster with the extender and the given nodes (each with
// its device plugin), waits until every node advertises and publishes, and
// registers cleanup (with log tails on failure).
func newCluster(t *testing.T, opts cluster.Options, nodes map[string][]cluster.FakeGPU) *cluster.Cluster {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c, err := cluster.Start(ctx, opts)
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
	if err := c.StartExtender(); err != nil {
		t.Fatalf("starting the extender: %v", err)
	}
	names := make([]string, 0, len(nodes))
	for name := range nodes {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if _, err := c.AddNode(name, nodes[name]); err != nil {
			t.Fatalf("adding node %s: %v", name, err)
		}
	}
	if err := c.WaitNodesAdvertise(ctx, names, 90*time.Second); err != nil {
		t.Fatal(err)
	}
	checkExtenderListeners(t, c)
	checkMetricsFormat(t, c.ExtenderMetricsURL+"/metrics", "vramslice_extender_bind_conflicts_total")
	for _, n := range c.Nodes() {
		checkMetricsFormat(t, n.MetricsURL+"/metrics", "vramslice_backend_errors_total")
	}
	t.Logf("cluster up: %d node(s) %v, extender at %s", len(names), names, c.ExtenderURL)
	return c
}

// checkExtenderListeners: with metricsAddr set (as the chart sets it), the probes and metrics
// answer there and not beside kube-scheduler's verbs, which answer only on listenAddr.
func checkExtenderListeners(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	status := func(method, url string) int {
		req, err := http.NewRequest(method, url, strings.NewReader("{}"))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, url, err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, check := range []struct {
		method, url string
		want        int
	}{
		{"GET", c.ExtenderMetricsURL + "/metrics", http.StatusOK},
		{"GET", c.ExtenderMetricsURL + "/healthz", http.StatusOK},
		{"GET", c.ExtenderURL + "/metrics", http.StatusNotFound},
		{"GET", c.ExtenderURL + "/readyz", http.StatusNotFound},
		{"POST", c.ExtenderMetricsURL + "/bind", http.StatusNotFound},
		{"POST", c.ExtenderURL + "/bind", http.StatusBadRequest}, // served: names the missing field
	} {
		if got := status(check.method, check.url); got != check.want {
			t.Fatalf("%s %s: status %d, want %d", check.method, check.url, got, check.want)
		}
	}
}

// prometheusAccept is the Accept header Prometheus sends when it scrapes.
const prometheusAccept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"

// checkMetricsFormat: a plain GET of url gets the Prometheus text format, which Prometheus'
// own parser reads with every family named vramslice_*, counters typed as counters under
// their _total name (wantCounter among them); a scraper preferring OpenMetrics gets that.
// Returns the families parsed.
func checkMetricsFormat(t *testing.T, url, wantCounter string) map[string]*dto.MetricFamily {
	t.Helper()
	scrape := func(accept string) (string, []byte) {
		req, err := http.NewRequest(http.MethodGet, url, nil)
		if err != nil {
			t.Fatal(err)
		}
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s %v", url, resp.Status, err)
		}
		return resp.Header.Get("Content-Type"), body
	}
	contentType, body := scrape("")
	if !strings.HasPrefix(contentType, "text/plain; version=0.0.4") {
		t.Fatalf("GET %s: Content-Type %q, want the Prometheus text format", url, contentType)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("GET %s: Prometheus' text parser refuses the page: %v\n%s", url, err, body)
	}
	for name, family := range families {
		if !strings.HasPrefix(name, "vramslice_") {
			t.Errorf("GET %s: family %s is not prefixed vramslice_", url, name)
		}
		if family.GetType() == dto.MetricType_COUNTER && !strings.HasSuffix(name, "_total") {
			t.Errorf("GET %s: counter %s is not named by its _total sample", url, name)
		}
	}
	if f := families[wantCounter]; f == nil || f.GetType() != dto.MetricType_COUNTER {
		t.Fatalf("GET %s: no counter %s in\n%s", url, wantCounter, body)
	}
	contentType, body = scrape(prometheusAccept)
	if !strings.HasPrefix(contentType, "application/openmetrics-text; version=1.0.0") ||
		!bytes.HasSuffix(body, []byte("# EOF\n")) {
		t.Fatalf("GET %s as Prometheus asks: Content-Type %q, want OpenMetrics ending in # EOF:\n%s", url, contentType, body)
	}
	return families
}

// checkNoForbidden fails the scenario when the extender or a device plugin was
// refused by the API server: the chart's RBAC (testdata/rbac.yaml) must be
// enough, and a binary that merely logs a 403 and carries on must not pass.
func checkNoForbidden(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	procs := []*cluster.Process{c.Extender}
	for _, n := range c.Nodes() {
		procs = append(procs, n.Plugin)
	}
	// kube-scheduler runs in-process with the chart's scheduler identity: its
	// client errors land in the Kubernetes log.
	if data, err := os.ReadFile(filepath.Join(c.Dir, "logs", "kubernetes.log")); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if strings.Contains(line, "is forbidden: User \"system:serviceaccount:"+cluster.SystemNamespace) {
				t.Errorf("an in-process component was refused by the API server (RBAC too narrow?): %s", line)
				break
			}
		}
	}
	for _, p := range procs {
		if p == nil {
			continue
		}
		data, err := os.ReadFile(p.LogPath)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			l := strings.ToLower(line)
			if strings.Contains(l, "forbidden") || strings.Contains(l, " 403") {
				t.Errorf("%s was refused by the API server (RBAC too narrow?): %s", p.Name, line)
				break
			}
		}
	}
}

func dumpLogs(t *testing.T, c *cluster.Cluster) {
	// Keep every log of a failed scenario under e2e/.work/logs/<test>/ (gitignored).
	keep := filepath.Join("..", ".work", "logs", t.Name())
	_ = os.RemoveAll(keep)
	if err := os.MkdirAll(keep, 0o755); err == nil {
		files, _ := filepath.Glob(filepath.Join(c.Dir, "logs", "*"))
		for _, f := range files {
			if data, err := os.ReadFile(f); err == nil {
				_ = os.WriteFile(filepath.Join(keep, filepath.Base(f)), data, 0o644)
			}
		}
		t.Logf("logs kept in e2e/.work/logs/%s", t.Name())
	}
	if c.Extender != nil {
		t.Logf("---- extender log tail ----\n%s", c.Extender.Tail(4000))
	}
	for _, n := range c.Nodes() {
		if n.Plugin != nil {
			t.Logf("---- device plugin %s log tail ----\n%s", n.Name, n.Plugin.Tail(3000))
		}
	}
}

type podOpt func(*v1.Pod)

func onNode(node string) podOpt {
	return func(p *v1.Pod) { p.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": node} }
}

// vramPod is a single-container pod asking for gib units of vramslice.io/vram-gib.
func vramPod(name string, gib int64, opts ...podOpt) *v1.Pod {
	p := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: v1.PodSpec{
			SchedulerName: cluster.SchedulerName,
			Containers: []v1.Container{{
				Name: "main", Image: "registry.k8s.io/pause:3.10",
				Resources: v1.ResourceRequirements{Limits: v1.ResourceList{
					cluster.ResourceName: *resource.NewQuantity(gib, resource.DecimalSI),
				}},
			}},
		},
	}
	for _, o := range opts {
		o(p)
	}
	return p
}

func createPod(t *testing.T, c *cluster.Cluster, p *v1.Pod) {
	t.Helper()
	if _, err := c.Client.CoreV1().Pods(ns).Create(c.Context(), p, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating pod %s: %v", p.Name, err)
	}
}

func getPod(t *testing.T, c *cluster.Cluster, name string) *v1.Pod {
	t.Helper()
	p, err := c.Client.CoreV1().Pods(ns).Get(c.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("getting pod %s: %v", name, err)
	}
	return p
}

func until(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		ok, err := cond()
		if err == nil && ok {
			return
		}
		lastErr = err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s (last error: %v)", timeout, what, lastErr)
}

// waitRunning waits for a pod to be Running and returns it.
func waitRunning(t *testing.T, c *cluster.Cluster, name string) *v1.Pod {
	t.Helper()
	var p *v1.Pod
	defer func() {
		if t.Failed() && p != nil {
			t.Logf("pod %s: node %q phase %s conditions %+v annotations %v events %q", name, p.Spec.NodeName, p.Status.Phase,
				p.Status.Conditions, p.Annotations, podEvents(t, c, name))
		}
	}()
	// Up to the scheduler's unschedulable flush (20 s, checked every 30 s) plus margin.
	until(t, 90*time.Second, "pod "+name+" Running", func() (bool, error) {
		var err error
		p, err = c.Client.CoreV1().Pods(ns).Get(c.Context(), name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		if p.Status.Phase == v1.PodFailed {
			return false, fmt.Errorf("pod failed: %s %s", p.Status.Reason, p.Status.Message)
		}
		return p.Status.Phase == v1.PodRunning, nil
	})
	return p
}

// unschedulable returns the PodScheduled=False condition of a pod, if any.
func unschedulable(p *v1.Pod) *v1.PodCondition {
	for i := range p.Status.Conditions {
		cond := &p.Status.Conditions[i]
		if cond.Type == v1.PodScheduled && cond.Status == v1.ConditionFalse {
			return cond
		}
	}
	return nil
}

// judgedUnschedulable: the scheduler found no node for the pod. A pod whose last attempt
// failed otherwise (reason SchedulerError: a bind refused by a race, the extender briefly
// unreachable) is retried after a backoff and may still be placed, so it is not settled.
func judgedUnschedulable(p *v1.Pod) bool {
	cond := unschedulable(p)
	return cond != nil && cond.Reason == v1.PodReasonUnschedulable
}

// waitUnschedulable waits for the scheduler's verdict on a pod and returns its message.
func waitUnschedulable(t *testing.T, c *cluster.Cluster, name string) string {
	t.Helper()
	var msg string
	until(t, 60*time.Second, "pod "+name+" to be marked unschedulable", func() (bool, error) {
		p, err := c.Client.CoreV1().Pods(ns).Get(c.Context(), name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		if p.Spec.NodeName != "" {
			return false, fmt.Errorf("pod was placed on %s", p.Spec.NodeName)
		}
		if cond := unschedulable(p); cond != nil {
			msg = cond.Message
			return true, nil
		}
		return false, nil
	})
	return msg
}

// podEvents returns "reason: message" of the events about a pod.
func podEvents(t *testing.T, c *cluster.Cluster, name string) []string {
	t.Helper()
	evs, err := c.Client.CoreV1().Events(ns).List(c.Context(), metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("involvedObject.name", name).String(),
	})
	if err != nil {
		t.Fatalf("listing events of %s: %v", name, err)
	}
	var out []string
	for _, e := range evs.Items {
		out = append(out, e.Reason+": "+e.Message)
	}
	return out
}

// placement is what a running pod got, from the hollow node's record of the
// device plugin's Allocate response and the extender's annotation.
type placement struct {
	Node, AnnotatedGPU, EnvGPU string
	LimitBytes                 int64
	Request                    int64
}

func placementOf(t *testing.T, p *v1.Pod) placement {
	t.Helper()
	env := cluster.ContainerEnv(p, "main")
	pl := placement{Node: p.Spec.NodeName, AnnotatedGPU: p.Annotations[cluster.AnnotationGPUUUID], EnvGPU: env["VRAMSLICE_GPU_UUID"]}
	if s := env["VRAMSLICE_VRAM_LIMIT_BYTES"]; s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("pod %s: VRAMSLICE_VRAM_LIMIT_BYTES=%q is not a number", p.Name, s)
		}
		pl.LimitBytes = v
	}
	q := p.Spec.Containers[0].Resources.Limits[cluster.ResourceName]
	pl.Request = q.Value()
	return pl
}

// checkRunningPod asserts the container env carries the pod's GPU (the one the
// extender assigned) and exact limit.
func checkRunningPod(t *testing.T, p *v1.Pod) placement {
	t.Helper()
	return checkRunning(t, p, true)
}

func checkRunning(t *testing.T, p *v1.Pod, sameGPU bool) placement {
	t.Helper()
	pl := placementOf(t, p)
	if pl.EnvGPU == "" || pl.LimitBytes == 0 {
		t.Fatalf("pod %s: container env lacks VRAMSLICE_GPU_UUID/VRAMSLICE_VRAM_LIMIT_BYTES: %q", p.Name, p.Annotations[cluster.RunOptionsAnnotation])
	}
	if pl.LimitBytes != pl.Request<<30 {
		t.Fatalf("pod %s: limit %d bytes, want %d GiB = %d", p.Name, pl.LimitBytes, pl.Request, pl.Request<<30)
	}
	if sameGPU && pl.AnnotatedGPU != "" && pl.AnnotatedGPU != pl.EnvGPU {
		t.Fatalf("pod %s: extender assigned GPU %s but the device plugin allocated %s", p.Name, pl.AnnotatedGPU, pl.EnvGPU)
	}
	if !strings.HasPrefix(pl.EnvGPU, "GPU-"+pl.Node+"-") {
		t.Fatalf("pod %s on node %s got GPU %s of another node", p.Name, pl.Node, pl.EnvGPU)
	}
	return pl
}

// settle waits until every pod with the prefix is Running, Failed or judged
// unschedulable (not merely failed once), and the count of Running pods has not
// changed for 3 s.
func settle(t *testing.T, c *cluster.Cluster, prefix string, timeout time.Duration) []v1.Pod {
	t.Helper()
	var pods []v1.Pod
	lastRunning, stableSince := -1, time.Now()
	until(t, timeout, "pods "+prefix+"* to settle", func() (bool, error) {
		list, err := c.Client.CoreV1().Pods(ns).List(c.Context(), metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		pods = pods[:0]
		running, undecided := 0, 0
		for _, p := range list.Items {
			if !strings.HasPrefix(p.Name, prefix) {
				continue
			}
			pods = append(pods, p)
			switch {
			case p.Status.Phase == v1.PodRunning:
				running++
			case p.Status.Phase == v1.PodFailed:
			case p.Spec.NodeName == "" && judgedUnschedulable(&p):
			default:
				undecided++
			}
		}
		if running != lastRunning {
			lastRunning, stableSince = running, time.Now()
		}
		return undecided == 0 && time.Since(stableSince) > 3*time.Second, nil
	})
	return pods
}

// checkNoOvercommit asserts the invariants over a set of pods: no Failed pods
// (the device manager refusing an over-committed node), every running pod's
// GPU and limit right, no GPU holding more units than it advertises, every
// unplaced pod with a reason. It returns units in use per GPU UUID.
func checkNoOvercommit(t *testing.T, c *cluster.Cluster, pods []v1.Pod) map[string]uint64 {
	t.Helper()
	return checkPods(t, c, pods, false)
}

// outageRejection tells a kubelet admission rejection caused by the device
// plugin or the kubelet's device manager being down (devices marked unhealthy,
// a gRPC call cut) from one caused by over-commit ("requested number of devices
// unavailable"), which is never allowed.
func outageRejection(p *v1.Pod) bool {
	m := p.Status.Message
	return p.Status.Phase == v1.PodFailed && !strings.Contains(m, "devices unavailable") &&
		(strings.Contains(m, "no healthy devices present") || strings.Contains(m, "rpc error"))
}

func checkPods(t *testing.T, c *cluster.Cluster, pods []v1.Pod, allowOutageRejections bool) map[string]uint64 {
	t.Helper()
	used := map[string]uint64{}
	// Pods of the same size on a node are interchangeable for accounting: the
	// device plugin may give pod A the GPU the extender reserved for pod B and
	// vice versa. Among pods whose annotation and allocation differ, per node and
	// size, the reserved GPUs and the allocated GPUs must be the same multiset.
	swaps := map[string][][2]string{}
	for i := range pods {
		p := &pods[i]
		switch {
		case allowOutageRejections && outageRejection(p):
			t.Logf("pod %s was rejected by its node while the device plugin was down (as a kubelet does): %s", p.Name, p.Status.Message)
		case p.Status.Phase == v1.PodFailed:
			t.Errorf("pod %s Failed: %s %s (the node refused it: over-commit?)", p.Name, p.Status.Reason, p.Status.Message)
		case p.Status.Phase == v1.PodRunning:
			pl := checkRunning(t, p, false)
			used[pl.EnvGPU] += uint64(pl.Request)
			if pl.AnnotatedGPU != pl.EnvGPU {
				k := pl.Node + "/" + strconv.FormatInt(pl.Request, 10)
				swaps[k] = append(swaps[k], [2]string{pl.AnnotatedGPU, pl.EnvGPU})
			}
		default:
			cond := unschedulable(p)
			if cond == nil || strings.TrimSpace(cond.Message) == "" {
				t.Errorf("pod %s not placed and without a clear reason (conditions %+v)", p.Name, p.Status.Conditions)
			}
		}
	}
	for k, pairs := range swaps {
		bal := map[string]int{}
		for _, pr := range pairs {
			bal[pr[0]]++
			bal[pr[1]]--
		}
		diverged := false
		for _, d := range bal {
			diverged = diverged || d != 0
		}
		if diverged {
			// Not an over-commit (units per GPU are checked below and by the kubelet's
			// device manager), but the extender's reservation and the kubelet's
			// allocation disagree until the extender reconciles from GpuNode.
			t.Logf("DIVERGENCE on %s GiB: reserved vs allocated GPU %v", k, pairs)
		} else {
			t.Logf("same-size swaps on %s GiB (interchangeable): %v", k, pairs)
		}
	}
	for _, n := range c.Nodes() {
		for _, g := range c.GPUs(n.Name) {
			units := uint64(parseGi(t, g.Total))
			if used[g.UUID] > units {
				t.Errorf("GPU %s holds %d units of pods, advertises %d: DOUBLE-BOOKED", g.UUID, used[g.UUID], units)
			}
		}
	}
	return used
}

func parseGi(t *testing.T, s string) int64 {
	t.Helper()
	q, err := resource.ParseQuantity(s)
	if err != nil {
		t.Fatalf("bad quantity %q: %v", s, err)
	}
	return q.Value() >> 30
}

// checkGpuNodesAgree waits until every GpuNode's allocatedUnits per GPU equals
// the units of the running pods on that GPU.
func checkGpuNodesAgree(t *testing.T, c *cluster.Cluster, used map[string]uint64) {
	t.Helper()
	var last string
	deadline := time.Now().Add(60 * time.Second)
	for {
		var diffs []string
		for _, n := range c.Nodes() {
			st, err := c.GpuNode(c.Context(), n.Name)
			if err != nil {
				diffs = append(diffs, fmt.Sprintf("%s: %v", n.Name, err))
				continue
			}
			for _, g := range st.GPUs {
				if g.AllocatedUnits != used[g.UUID] {
					diffs = append(diffs, fmt.Sprintf("%s: GpuNode says %d allocated, pods hold %d", g.UUID, g.AllocatedUnits, used[g.UUID]))
				}
			}
		}
		if len(diffs) == 0 {
			return
		}
		last = strings.Join(diffs, "; ")
		if time.Now().After(deadline) {
			t.Fatalf("GpuNode status disagrees with the pods: %s", last)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func deletePod(t *testing.T, c *cluster.Cluster, name string) {
	t.Helper()
	zero := int64(0)
	if err := c.Client.CoreV1().Pods(ns).Delete(c.Context(), name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatalf("deleting pod %s: %v", name, err)
	}
}

// checkGpuNodePods waits until every GpuNode lists exactly the running pods the
// kubelet allocated on each of its GPUs, with their units and limits (what
// `kubectl describe gpunode` shows), for the pods with the given name prefix.
func checkGpuNodePods(t *testing.T, c *cluster.Cluster, prefix string) {
	t.Helper()
	var last string
	deadline := time.Now().Add(60 * time.Second)
	for {
		list, err := c.Client.CoreV1().Pods(ns).List(c.Context(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]string{} // "gpu/pod" -> "units/limit"
		for i := range list.Items {
			p := &list.Items[i]
			if !strings.HasPrefix(p.Name, prefix) || p.Status.Phase != v1.PodRunning {
				continue
			}
			pl := placementOf(t, p)
			want[pl.EnvGPU+"/"+p.Name] = fmt.Sprintf("%d/%d", pl.Request, pl.LimitBytes)
		}
		got := map[string]string{}
		for _, n := range c.Nodes() {
			st, err := c.GpuNode(c.Context(), n.Name)
			if err != nil {
				continue
			}
			for _, g := range st.GPUs {
				for _, p := range g.Pods {
					if strings.HasPrefix(p.Name, prefix) {
						got[g.UUID+"/"+p.Name] = fmt.Sprintf("%d/%d", p.AllocatedUnits, p.LimitBytes)
					}
				}
			}
		}
		var diffs []string
		for k, v := range want {
			if got[k] != v {
				diffs = append(diffs, fmt.Sprintf("%s: pods say %s, GpuNode says %q", k, v, got[k]))
			}
		}
		for k, v := range got {
			if _, ok := want[k]; !ok {
				diffs = append(diffs, fmt.Sprintf("%s: GpuNode lists %s for no running pod", k, v))
			}
		}
		if len(diffs) == 0 {
			t.Logf("GpuNode status lists the same %d pod allocations as the pods", len(want))
			return
		}
		sort.Strings(diffs)
		last = strings.Join(diffs, "; ")
		if time.Now().After(deadline) {
			t.Fatalf("GpuNode pod lists disagree with the pods: %s", last)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
