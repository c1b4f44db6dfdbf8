package cluster

import (
	"fmt"
	"os"
	"path/filepath"

	"sigs.k8s.io/yaml"
)

// FakeGPU is one GPU in the device plugin's fake-backend file (read on every poll).
type FakeGPU struct {
	UUID            string           `json:"uuid"`
	Index           int              `json:"index"`
	Model           string           `json:"model"`
	Total           string           `json:"total"`
	Used            string           `json:"used,omitempty"`
	Healthy         bool             `json:"healthy"`
	UnhealthyReason string           `json:"unhealthyReason,omitempty"`
	Processes       []FakeGPUProcess `json:"processes,omitempty"`
}

// FakeGPUProcess is a process using memory on a fake GPU; PodUID empty means "not a pod".
type FakeGPUProcess struct {
	PID    int    `json:"pid"`
	Used   string `json:"used"`
	PodUID string `json:"podUid,omitempty"`
}

// FakeDriverVersion is the driver version every hollow node's fake backend reports, as NVML
// writes one (the DRA slice publishes it as the semantic version 580.65.6).
const FakeDriverVersion = "580.65.06"

type fakeGPUFile struct {
	DriverVersion string    `json:"driverVersion,omitempty"`
	GPUs          []FakeGPU `json:"gpus"`
}

// writeFakeGPUs writes the fake-GPU file atomically (temp file + rename), so the
// plugin never reads a half-written file.
func writeFakeGPUs(path string, gpus []FakeGPU) error {
	data, err := yaml.Marshal(fakeGPUFile{DriverVersion: FakeDriverVersion, GPUs: gpus})
	if err != nil {
		return fmt.Errorf("encoding fake GPUs: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".fake-gpus-*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// GPU is a convenience constructor for a healthy fake GPU.
func GPU(node string, index int, model, total string) FakeGPU {
	return FakeGPU{UUID: fmt.Sprintf("GPU-%s-%d", node, index), Index: index, Model: model, Total: total, Healthy: true}
}
