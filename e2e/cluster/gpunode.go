package cluster

import (
	"context"
	"encoding/json"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GpuNodeGVR is the GpuNode custom resource.
var GpuNodeGVR = schema.GroupVersionResource{Group: "vramslice.io", Version: "v1alpha1", Resource: "gpunodes"}

// GpuNodeStatus is the part of a GpuNode's status the e2e checks read.
type GpuNodeStatus struct {
	Unit         string          `json:"unit"`
	ResourceName string          `json:"resourceName"`
	ObservedAt   string          `json:"observedAt"`
	GPUs         []GpuNodeGPU    `json:"gpus"`
	Summary      json.RawMessage `json:"summary"`
}

// GpuNodeGPU is one GPU of a GpuNode's status.
type GpuNodeGPU struct {
	Index          int          `json:"index"`
	UUID           string       `json:"uuid"`
	Model          string       `json:"model"`
	TotalBytes     uint64       `json:"totalBytes"`
	UsedBytes      uint64       `json:"usedBytes"`
	FreeBytes      uint64       `json:"freeBytes"`
	Units          uint64       `json:"units"`
	AllocatedUnits uint64       `json:"allocatedUnits"`
	Healthy        bool         `json:"healthy"`
	HealthReason   string       `json:"healthReason"`
	Pods           []GpuNodePod `json:"pods"`
	// ProcessesWithoutPod are GPU processes that belong to no pod.
	ProcessesWithoutPod []GpuNodeProcess `json:"processesWithoutPod"`
}

// GpuNodeProcess is a GPU process and its memory.
type GpuNodeProcess struct {
	PID       int    `json:"pid"`
	UsedBytes uint64 `json:"usedBytes"`
}

// GpuNodePod is a pod's allocation on a GPU as the plugin reports it.
type GpuNodePod struct {
	Namespace      string `json:"namespace"`
	Name           string `json:"name"`
	UID            string `json:"uid"`
	AllocatedUnits uint64 `json:"allocatedUnits"`
	LimitBytes     uint64 `json:"limitBytes"`
	UsedBytes      uint64 `json:"usedBytes"`
}

// GpuNode reads a node's GpuNode status.
func (c *Cluster) GpuNode(ctx context.Context, name string) (*GpuNodeStatus, error) {
	u, err := c.Dynamic.Resource(GpuNodeGVR).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	raw, err := json.Marshal(u.Object["status"])
	if err != nil {
		return nil, err
	}
	var st GpuNodeStatus
	if err := json.Unmarshal(raw, &st); err != nil {
		return nil, fmt.Errorf("decoding GpuNode %s status: %w", name, err)
	}
	return &st, nil
}
