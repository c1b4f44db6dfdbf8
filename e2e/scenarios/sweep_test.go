package scenarios

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vramslice/vramslice/e2e/cluster"
)

// Scenario 9: the device plugin's accounting sweeper deletes an allocation's files once the
// kubelet's PodResources record has not listed it for accountingSweepAfter. The record never
// lists plain init containers (the kubelet's own PodResources server, over its device manager,
// answers here), so a long init container's files must be kept while it runs; and after it
// completed too, while its pod runs: a recreated sandbox re-runs it with the same mounts. They
// go once its pod is gone.
func TestScenario9_SweeperKeepsARunningInitContainersFiles(t *testing.T) {
	const sweepAfter = time.Second
	c := newCluster(t, cluster.Options{PluginExtraConfig: "accountingSweepAfter: 1s\n"}, map[string][]cluster.FakeGPU{
		"ini": {cluster.GPU("ini", 0, l4, "16Gi")},
	})
	p := vramPod("s9-loader", 0)
	p.Spec.Containers[0].Resources = v1.ResourceRequirements{}
	p.Spec.InitContainers = []v1.Container{{
		Name: "loader", Image: "registry.k8s.io/pause:3.10",
		Resources: v1.ResourceRequirements{Limits: v1.ResourceList{
			cluster.ResourceName: *resource.NewQuantity(3, resource.DecimalSI),
		}},
	}}
	p.Annotations = map[string]string{cluster.InitRunningAnnotation: "true"}
	createPod(t, c, p)

	var files []string
	until(t, 60*time.Second, "s9-loader's init container to be allocated and running", func() (bool, error) {
		got := getPod(t, c, "s9-loader")
		if len(got.Status.InitContainerStatuses) == 0 || got.Status.InitContainerStatuses[0].State.Running == nil {
			return false, nil
		}
		files = accountingFiles(t, c, got, "loader")
		return true, nil
	})
	if len(files) != 2 {
		t.Fatalf("the init container's run options mount %d accounting paths, want its directory and limit file: %v", len(files), files)
	}
	t.Logf("init container running; its accounting files: %v", files)

	// Many sweep periods (the plugin polls every 500ms) with the init container unlisted.
	time.Sleep(8 * sweepAfter)
	for _, f := range files {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("the running init container's accounting file was swept: %v", err)
		}
	}

	// The init container completed and the pod runs: still kept.
	completeInit(t, c, "s9-loader")
	time.Sleep(8 * sweepAfter)
	for _, f := range files {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("the completed init container's accounting file was swept while its pod runs: %v", err)
		}
	}

	// The pod gone, nothing holds the allocation: the same sweeper deletes its files.
	deletePod(t, c, "s9-loader")
	until(t, 30*time.Second, "the ended allocation's accounting files to be swept", func() (bool, error) {
		for _, f := range files {
			if _, err := os.Stat(f); err == nil || !os.IsNotExist(err) {
				return false, nil
			}
		}
		return true, nil
	})
}

// accountingFiles returns the host paths under the node's accounting root that the hollow
// kubelet's device manager mounts into a container (from its recorded run options).
func accountingFiles(t *testing.T, c *cluster.Cluster, p *v1.Pod, container string) []string {
	t.Helper()
	var ro cluster.PodRunOptions
	if err := json.Unmarshal([]byte(p.Annotations[cluster.RunOptionsAnnotation]), &ro); err != nil {
		t.Fatalf("pod %s has no run options: %v", p.Name, err)
	}
	root := filepath.Join(c.Node(p.Spec.NodeName).Dir, "accounting") + string(filepath.Separator)
	var out []string
	for _, m := range ro[container].Mounts {
		if strings.HasPrefix(m.HostPath, root) {
			out = append(out, m.HostPath)
		}
	}
	return out
}

// completeInit writes the status a kubelet writes once a pod's init containers have completed
// and its app containers run: phase Running, every init container terminated with exit code 0.
func completeInit(t *testing.T, c *cluster.Cluster, name string) {
	t.Helper()
	until(t, 30*time.Second, name+"'s init containers to be marked completed", func() (bool, error) {
		p := getPod(t, c, name)
		now := metav1.Now()
		for i := range p.Status.InitContainerStatuses {
			p.Status.InitContainerStatuses[i].State = v1.ContainerState{Terminated: &v1.ContainerStateTerminated{
				ExitCode: 0, Reason: "Completed", StartedAt: now, FinishedAt: now,
			}}
		}
		for i := range p.Status.ContainerStatuses {
			p.Status.ContainerStatuses[i].State = v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: now}}
		}
		p.Status.Phase = v1.PodRunning
		_, err := c.Client.CoreV1().Pods(ns).UpdateStatus(c.Context(), p, metav1.UpdateOptions{})
		return err == nil, err
	})
}
