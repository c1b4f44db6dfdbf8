package main

import (
	"context"
	"fmt"
	"time"

	v1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vramslice/vramslice/e2e/cluster"
)

// runDRA starts a cluster of nNodes DRA hollow nodes (node agent in mode: dra, the kubelet's
// DRA manager, registration through its plugin manager unless $VRAMSLICE_E2E_DRA_REGISTRATION
// says direct: the plugin manager needs one inotify instance per node), waits for every node's
// ResourceSlice, then creates nPods claims of 1-4 GiB with a pod each (kube-scheduler without
// the extender: its DynamicResources plugin allocates the claims) and measures how fast they
// are bound and Running, as the device-plugin runs are measured.
func runDRA(ctx context.Context, nPods, nNodes, nGPUs int, timeout time.Duration, binDir string, schedulerProcesses bool) (rates, error) {
	t0 := time.Now()
	c, err := cluster.Start(ctx, cluster.Options{DRA: true, PlainScheduler: true, PluginPollInterval: "2s", BinDir: binDir,
		SchedulerProcesses: schedulerProcesses})
	if err != nil {
		return rates{}, err
	}
	defer c.StopQuietly()
	names := make([]string, 0, nNodes)
	for i := 0; i < nNodes; i++ {
		name := fmt.Sprintf("dra-%02d", i)
		names = append(names, name)
		g := make([]cluster.FakeGPU, nGPUs)
		for j := range g {
			g[j] = cluster.GPU(name, j, "NVIDIA A100-SXM4-80GB", "80Gi")
		}
		if _, err := c.AddDRANode(name, g); err != nil {
			return rates{}, err
		}
	}
	deadline := time.Now().Add(3 * time.Minute)
	for {
		slices, err := c.Client.ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{})
		if err == nil && len(slices.Items) >= nNodes {
			break
		}
		if time.Now().After(deadline) {
			return rates{}, fmt.Errorf("only %d of %d ResourceSlices after 3m (last error: %v)", len(slices.Items), nNodes, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := c.WaitDRARegistered(names, 2*time.Minute); err != nil {
		return rates{}, err
	}
	fmt.Printf("DRA cluster: %d hollow nodes x %d GPUs with their ResourceSlices and the driver registered (%s), ready in %s\n",
		nNodes, nGPUs, cluster.DRARegistration(), time.Since(t0).Round(time.Millisecond))
	prefix := "dra"
	create := func(i int) error {
		name := fmt.Sprintf("%s-%04d", prefix, i)
		if _, err := c.Client.ResourceV1().ResourceClaims("default").Create(ctx, benchClaim(name, int64(1+i%4)), metav1.CreateOptions{}); err != nil {
			return err
		}
		_, err := c.Client.CoreV1().Pods("default").Create(ctx, claimPod(prefix, name), metav1.CreateOptions{})
		return err
	}
	return scheduleWith(ctx, c, prefix, "DynamicResources", nPods, timeout, func() {}, create)
}

// benchClaim asks for one vramslice device with gib GiB of memory.
func benchClaim(name string, gib int64) *resourcev1.ResourceClaim {
	return &resourcev1.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{Requests: []resourcev1.DeviceRequest{{
			Name: "vram",
			Exactly: &resourcev1.ExactDeviceRequest{
				DeviceClassName: cluster.DRADeviceClass,
				AllocationMode:  resourcev1.DeviceAllocationModeExactCount,
				Count:           1,
				Capacity: &resourcev1.CapacityRequirements{Requests: map[resourcev1.QualifiedName]resource.Quantity{
					"memory": *resource.NewQuantity(gib<<30, resource.BinarySI),
				}},
			},
		}}}},
	}
}

// claimPod is the bench pod that uses claim (scheduled by the plain kube-scheduler profile).
func claimPod(prefix, claim string) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: claim, Namespace: "default", Labels: map[string]string{"bench": prefix}},
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
