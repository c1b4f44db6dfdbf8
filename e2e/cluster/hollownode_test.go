package cluster

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	plugin "k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1"
)

// TestHollowNodeWithKubeletStubPlugin checks the harness itself, independent of
// our Rust binaries: the kubelet's own stub device plugin registers with a
// hollow node's real device manager, the Node advertises its devices, a pod
// bound to the node gets Allocate'd, records the runtime options and runs,
// PodResources reports the devices, deleting the pod frees them, and a device
// manager restart needs a re-registration.
func TestHollowNodeWithKubeletStubPlugin(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := Start(ctx, Options{})
	if err != nil {
		t.Fatalf("starting cluster: %v", err)
	}
	defer c.Stop()
	n, err := c.AddBareNode("stub-node", nil)
	if err != nil {
		t.Fatal(err)
	}
	const res = "example.com/thing"
	devs := []*pluginapi.Device{{ID: "d0", Health: pluginapi.Healthy}, {ID: "d1", Health: pluginapi.Healthy}, {ID: "d2", Health: pluginapi.Healthy}}
	register := func() *plugin.Stub {
		stub := plugin.NewDevicePluginStub(klog.Background(), devs, filepath.Join(n.SocketDir(), "stub.sock"), res, false, false)
		stub.SetAllocFunc(func(r *pluginapi.AllocateRequest, _ map[string]*pluginapi.Device) (*pluginapi.AllocateResponse, error) {
			resp := &pluginapi.AllocateResponse{}
			for _, cr := range r.ContainerRequests {
				resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{
					Envs: map[string]string{"STUB_DEVICES": strings.Join(cr.DevicesIds, ",")},
				})
			}
			return resp, nil
		})
		if err := stub.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := stub.Register(ctx, filepath.Join(n.SocketDir(), "kubelet.sock"), res, ""); err != nil {
			t.Fatal(err)
		}
		return stub
	}
	stub := register()
	defer func() { _ = stub.Stop(klog.Background()) }()

	waitAllocatable := func(want int64) {
		t.Helper()
		err := waitFor(ctx, 30*time.Second, 100*time.Millisecond, "allocatable", func() (bool, error) {
			node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			q := node.Status.Allocatable[res]
			return q.Value() == want, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	waitAllocatable(3)

	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p1", Namespace: "default"},
		Spec: v1.PodSpec{NodeName: n.Name, Containers: []v1.Container{{
			Name: "main", Image: "busybox",
			Resources: v1.ResourceRequirements{Limits: v1.ResourceList{res: resource.MustParse("2")}},
		}}},
	}
	if _, err := c.Client.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var got *v1.Pod
	err = waitFor(ctx, 30*time.Second, 100*time.Millisecond, "pod running", func() (bool, error) {
		p, err := c.Client.CoreV1().Pods("default").Get(ctx, "p1", metav1.GetOptions{})
		got = p
		return err == nil && p.Status.Phase == v1.PodRunning, err
	})
	if err != nil {
		t.Fatalf("%v (pod status %+v)", err, got.Status)
	}
	env := ContainerEnv(got, "main")
	if ids := strings.Split(env["STUB_DEVICES"], ","); len(ids) != 2 {
		t.Fatalf("want 2 device IDs in the recorded env, got %q (annotation %q)", env["STUB_DEVICES"], got.Annotations[RunOptionsAnnotation])
	}
	if alloc := (devicesProvider{n.HollowNode}).GetDevices(string(got.UID), "main"); len(alloc) != 2 {
		t.Fatalf("PodResources GetDevices: want 2 devices, got %v", alloc)
	}

	// Restart the device manager: the stub must re-register for the resource to come back.
	if err := n.RestartDeviceManager(); err != nil {
		t.Fatal(err)
	}
	_ = stub.Stop(klog.Background())
	stub = register()
	waitAllocatable(3)
	if alloc := (devicesProvider{n.HollowNode}).GetDevices(string(got.UID), "main"); len(alloc) != 2 {
		t.Fatalf("after restart the checkpoint should keep the pod's 2 devices, got %v", alloc)
	}

	zero := int64(0)
	if err := c.Client.CoreV1().Pods("default").Delete(ctx, "p1", metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	err = waitFor(ctx, 30*time.Second, 100*time.Millisecond, "devices freed", func() (bool, error) {
		return len((devicesProvider{n.HollowNode}).GetDevices(string(got.UID), "main")) == 0, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
