package scenarios

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"

	"github.com/vramslice/vramslice/e2e/cluster"
)

// Enforcement: a pod whose spec sets VRAMSLICE_VRAM_LIMIT_BYTES to a
// huge value still receives the plugin's limit (the env from Allocate and the
// read-only limit file the guard always reads), and a fake GPU process of that
// pod using more than its limit produces the watchdog's Warning Event on the
// right pod, and none on its neighbour.
func TestScenarioEnforcement_LimitFileAndWatchdogEvent(t *testing.T) {
	c := newCluster(t, cluster.Options{}, map[string][]cluster.FakeGPU{
		"guarded": {cluster.GPU("guarded", 0, a100, "40Gi")},
	})
	liar := vramPod("s8-liar", 4)
	liar.Spec.Containers[0].Env = []v1.EnvVar{{Name: "VRAMSLICE_VRAM_LIMIT_BYTES", Value: "1099511627776"}}
	createPod(t, c, liar)
	createPod(t, c, vramPod("s8-calm", 2))
	liarPod := waitRunning(t, c, "s8-liar")
	calmPod := waitRunning(t, c, "s8-calm")
	pl := checkRunningPod(t, liarPod)
	if pl.LimitBytes != 4<<30 {
		t.Fatalf("s8-liar got limit %d from Allocate, want %d", pl.LimitBytes, int64(4<<30))
	}

	var ro cluster.PodRunOptions
	if err := json.Unmarshal([]byte(liarPod.Annotations[cluster.RunOptionsAnnotation]), &ro); err != nil {
		t.Fatalf("run options of s8-liar: %v", err)
	}
	main := ro["main"]
	if got := main.Env["VRAMSLICE_LIMIT_FILE"]; got != "/var/run/vramslice/limit" {
		t.Fatalf("VRAMSLICE_LIMIT_FILE = %q, want /var/run/vramslice/limit (env %v)", got, main.Env)
	}
	var limitMount *cluster.MountOption
	for i := range main.Mounts {
		if main.Mounts[i].ContainerPath == "/var/run/vramslice/limit" {
			limitMount = &main.Mounts[i]
		}
	}
	if limitMount == nil || !limitMount.ReadOnly {
		t.Fatalf("no read-only limit file mount in %+v", main.Mounts)
	}
	data, err := os.ReadFile(limitMount.HostPath)
	if err != nil {
		t.Fatalf("reading the limit file the plugin wrote: %v", err)
	}
	want := fmt.Sprintf("limit=%d\ngpu=%s\n", int64(4<<30), pl.EnvGPU)
	if string(data) != want {
		t.Fatalf("limit file %s holds %q, want %q", limitMount.HostPath, data, want)
	}
	t.Logf("s8-liar (spec env 1 TiB) got the plugin's limit: env %s, read-only %s = %q",
		main.Env["VRAMSLICE_VRAM_LIMIT_BYTES"], limitMount.ContainerPath, data)

	// A process of s8-liar takes 6 GiB of its 4 GiB; s8-calm's stays within.
	gpus := c.GPUs("guarded")
	gpus[0].Processes = []cluster.FakeGPUProcess{
		{PID: 5151, Used: "6Gi", PodUID: string(liarPod.UID)},
		{PID: 5252, Used: "1Gi", PodUID: string(calmPod.UID)},
	}
	if err := c.SetGPUs("guarded", gpus); err != nil {
		t.Fatal(err)
	}
	var events []string
	until(t, 60*time.Second, "a VramLimitExceeded event on s8-liar", func() (bool, error) {
		events = podEvents(t, c, "s8-liar")
		for _, e := range events {
			if strings.HasPrefix(e, "VramLimitExceeded: ") && strings.Contains(e, "6442450944 bytes") &&
				strings.Contains(e, "4294967296 bytes") && strings.Contains(e, "[5151]") {
				return true, nil
			}
		}
		return false, nil
	})
	t.Logf("s8-liar events: %q", events)
	for _, e := range podEvents(t, c, "s8-calm") {
		if strings.HasPrefix(e, "Vram") {
			t.Fatalf("s8-calm is within its limit but got %q", e)
		}
	}
}
