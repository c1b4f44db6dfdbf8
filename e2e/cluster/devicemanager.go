package cluster

import (
	_ "unsafe" // for go:linkname

	cadvisorapi "github.com/google/cadvisor/info/v1"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
)

// newManagerImpl is the kubelet device manager's own constructor that takes the
// registration socket path. The exported NewManagerImpl hard-codes
// /var/lib/kubelet/device-plugins/kubelet.sock; reaching the unexported one lets
// every hollow node run the unmodified manager on its own directory inside one
// process (no root, no mount namespaces). The signature is checked against
// Kubernetes v1.34.4 (pkg/kubelet/cm/devicemanager/manager.go); a mismatch would
// fail at link or run time, so go.mod pins the exact version.
//
//go:linkname newManagerImpl k8s.io/kubernetes/pkg/kubelet/cm/devicemanager.newManagerImpl
func newManagerImpl(socketPath string, topology []cadvisorapi.Node, topologyAffinityStore topologymanager.Store) (*devicemanager.ManagerImpl, error)
