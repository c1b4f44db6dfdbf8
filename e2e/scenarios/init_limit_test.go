package scenarios

import (
	"fmt"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/vramslice/vramslice/e2e/cluster"
)

// Enforcement while a plain init container runs: PodResources never lists it, yet it may use
// more than the app containers after it (an engine build before a server). While it has not
// completed, its pod's limit is the pod's effective request (8 GiB, not the app's 4 GiB), so
// the watchdog sees no breach; a pod whose app containers ask for no VRAM appears on its
// annotated GPU with its init container's limit, its process no process without a pod. Once the
// init container has completed, the app's 4 GiB is the limit again and the same usage is a
// breach.
func TestScenarioEnforcement_InitContainerLimit(t *testing.T) {
	c := newCluster(t, cluster.Options{}, map[string][]cluster.FakeGPU{
		"trt": {cluster.GPU("trt", 0, l4, "16Gi")},
	})
	initPod := func(name string, app, init int64) *v1.Pod {
		p := vramPod(name, app)
		if app == 0 {
			p.Spec.Containers[0].Resources = v1.ResourceRequirements{}
		}
		p.Spec.InitContainers = []v1.Container{{
			Name: "build", Image: "registry.k8s.io/pause:3.10",
			Resources: v1.ResourceRequirements{Limits: v1.ResourceList{
				cluster.ResourceName: *resource.NewQuantity(init, resource.DecimalSI),
			}},
		}}
		p.Annotations = map[string]string{cluster.InitRunningAnnotation: "true"}
		return p
	}
	createPod(t, c, initPod("s10-engine", 4, 8))
	createPod(t, c, initPod("s10-fetch", 0, 3))
	uids := map[string]string{}
	for _, name := range []string{"s10-engine", "s10-fetch"} {
		until(t, 60*time.Second, name+"'s init container to be running", func() (bool, error) {
			got := getPod(t, c, name)
			uids[name] = string(got.UID)
			s := got.Status.InitContainerStatuses
			return len(s) == 1 && s[0].State.Running != nil, nil
		})
	}

	// The engine build uses 7 GiB (over the app's 4, within the init container's 8); the
	// fetcher 2 GiB of its 3.
	gpus := c.GPUs("trt")
	gpus[0].Processes = []cluster.FakeGPUProcess{
		{PID: 6161, Used: "7Gi", PodUID: uids["s10-engine"]},
		{PID: 6262, Used: "2Gi", PodUID: uids["s10-fetch"]},
	}
	if err := c.SetGPUs("trt", gpus); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"s10-engine": "4/8/7", "s10-fetch": "0/3/2"} // units/limit GiB/used GiB
	var last string
	until(t, 60*time.Second, "the GpuNode status to show the init containers' limits", func() (bool, error) {
		st, err := c.GpuNode(c.Context(), "trt")
		if err != nil || len(st.GPUs) != 1 {
			return false, err
		}
		got := map[string]string{}
		for _, p := range st.GPUs[0].Pods {
			got[p.Name] = fmt.Sprintf("%d/%d/%d", p.AllocatedUnits, p.LimitBytes>>30, p.UsedBytes>>30)
		}
		last = fmt.Sprintf("pods %v, processes without pod %v", got, st.GPUs[0].ProcessesWithoutPod)
		ok := len(st.GPUs[0].ProcessesWithoutPod) == 0
		for name, w := range want {
			ok = ok && got[name] == w
		}
		if !ok {
			return false, fmt.Errorf("%s; want units/limit/used %v", last, want)
		}
		return true, nil
	})
	t.Logf("while the init containers run: %s", last)
	// The watchdog judged that same report before it was written: no breach on either pod.
	for _, name := range []string{"s10-engine", "s10-fetch"} {
		for _, e := range podEvents(t, c, name) {
			if strings.HasPrefix(e, "Vram") {
				t.Fatalf("%s is within its init container's limit but got %q", name, e)
			}
		}
	}

	// The engine's init container completed: the app's 4 GiB is the limit, 7 GiB a breach.
	completeInit(t, c, "s10-engine")
	until(t, 60*time.Second, "a VramLimitExceeded event on s10-engine against its app's limit", func() (bool, error) {
		for _, e := range podEvents(t, c, "s10-engine") {
			if strings.HasPrefix(e, "VramLimitExceeded: ") && strings.Contains(e, "(4294967296 bytes)") &&
				strings.Contains(e, "[6161]") {
				return true, nil
			}
		}
		return false, nil
	})
	for _, e := range podEvents(t, c, "s10-fetch") {
		if strings.HasPrefix(e, "Vram") {
			t.Fatalf("s10-fetch is within its init container's limit but got %q", e)
		}
	}
}
