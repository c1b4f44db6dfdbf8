package cluster

import (
	"context"
	"fmt"
	"net"
	"os"

	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"
	podresourcesapi "k8s.io/kubelet/pkg/apis/podresources/v1"
	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
)

// servePodResources serves the kubelet's PodResources v1 API, backed by the
// kubelet's own server implementation over this node's device manager.
func (h *HollowNode) servePodResources() error {
	sock := h.PodResourcesSocket()
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("node %s pod-resources socket: %w", h.Name, err)
	}
	providers := podresources.PodResourcesProviders{
		Pods: podsProvider{h}, Devices: devicesProvider{h}, Cpus: noCPUs{}, Memory: noMemory{}, DynamicResources: noDRA{},
	}
	h.grpc = grpc.NewServer()
	podresourcesapi.RegisterPodResourcesListerServer(h.grpc, podresources.NewV1PodResourcesServer(klog.NewContext(context.Background(), h.logger), providers))
	go func() { _ = h.grpc.Serve(l) }()
	return nil
}

type podsProvider struct{ h *HollowNode }

func (p podsProvider) GetActivePods() []*v1.Pod { return p.h.snapshotActive() }
func (p podsProvider) GetPods() []*v1.Pod       { return p.h.snapshotActive() }
func (p podsProvider) GetPodByName(ns, name string) (*v1.Pod, bool) {
	for _, pod := range p.h.snapshotActive() {
		if pod.Namespace == ns && pod.Name == name {
			return pod, true
		}
	}
	return nil, false
}

type devicesProvider struct{ h *HollowNode }

func (d devicesProvider) UpdateAllocatedDevices(logger klog.Logger) {
	d.h.manager().UpdateAllocatedDevices(logger)
}
func (d devicesProvider) GetDevices(podUID, containerName string) []*podresourcesapi.ContainerDevices {
	return toContainerDevices(d.h.manager().GetDevices(podUID, containerName))
}
func (d devicesProvider) GetAllocatableDevices(logger klog.Logger) []*podresourcesapi.ContainerDevices {
	return toContainerDevices(d.h.manager().GetAllocatableDevices(logger))
}

// toContainerDevices mirrors the kubelet's containerDevicesFromResourceDeviceInstances.
func toContainerDevices(devs devicemanager.ResourceDeviceInstances) []*podresourcesapi.ContainerDevices {
	var out []*podresourcesapi.ContainerDevices
	for res, instances := range devs {
		for id, dev := range instances {
			cd := &podresourcesapi.ContainerDevices{ResourceName: res, DeviceIds: []string{id}}
			if topo := dev.GetTopology(); topo != nil && len(topo.GetNodes()) > 0 {
				cd.Topology = &podresourcesapi.TopologyInfo{}
				for _, n := range topo.GetNodes() {
					cd.Topology.Nodes = append(cd.Topology.Nodes, &podresourcesapi.NUMANode{ID: n.GetID()})
				}
			}
			out = append(out, cd)
		}
	}
	return out
}

type noCPUs struct{}

func (noCPUs) GetCPUs(*v1.Pod, *v1.Container) []int64 { return nil }
func (noCPUs) GetPodCPUs(string) []int64              { return nil }
func (noCPUs) GetAllocatableCPUs() []int64            { return nil }

type noMemory struct{}

func (noMemory) GetMemory(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesapi.ContainerMemory {
	return nil
}
func (noMemory) GetPodMemory(klog.Logger, string) []*podresourcesapi.ContainerMemory { return nil }
func (noMemory) GetAllocatableMemory(klog.Logger) []*podresourcesapi.ContainerMemory { return nil }

type noDRA struct{}

func (noDRA) GetDynamicResources(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesapi.DynamicResource {
	return nil
}
