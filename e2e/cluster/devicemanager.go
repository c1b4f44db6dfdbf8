package cluster

import (
	_ "unsafe" // for go:linkname

	cadvisorapi "github.com/google/cadvisor/lib/model"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
)

// newManagerImpl is the kubelet device manager's own constructor that takes the
// registration socket path. The exported NewManagerImpl hard-codes
// /var/lib/kubelet/device-plugins/kubelet.sock; reaching the unexported one lets
// every hollow node run the unmodified manager on its own directory inside one
// process (no root, no mount namespaces). The signature is checked against
// Kubernetes v1.37.2 (pkg/kubelet/cm/devicemanager/manager.go), where it is
//
//	func newManagerImpl(logger klog.Logger, socketPath string, topology []cadvisorapi.Node, topologyAffinityStore topologymanager.Store) (*ManagerImpl, error)
//
// (1.34 had no logger, and took cadvisor's info/v1 Node; 1.37 takes
// github.com/google/cadvisor/lib/model's). The linker matches the symbol by name
// only, so a changed signature would not fail to link: it would be called with the
// wrong arguments. Two guards make a bump fail loudly instead:
// the assignment of the exported sibling below (which forwards its arguments to
// this one) stops the build when that changes shape, and
// TestDeviceManagerLinknameSignature compares this declaration (parameters,
// results and the packages behind their qualifiers) with the source of the
// devicemanager package the module graph holds. go.mod pins the exact version.
//
//go:linkname newManagerImpl k8s.io/kubernetes/pkg/kubelet/cm/devicemanager.newManagerImpl
func newManagerImpl(logger klog.Logger, socketPath string, topology []cadvisorapi.Node, topologyAffinityStore topologymanager.Store) (*devicemanager.ManagerImpl, error)

// The build fails here when NewManagerImpl, which calls newManagerImpl with the
// same arguments plus the socket path, changes shape.
var _ func(klog.Logger, []cadvisorapi.Node, topologymanager.Store) (*devicemanager.ManagerImpl, error) = devicemanager.NewManagerImpl
