package cluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	draplugin "k8s.io/kubernetes/pkg/kubelet/cm/dra/plugin"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
)

// DRADriver is the DRA driver name of vramslice's node agent in mode: dra.
const DRADriver = "vramslice.io"

// DRADeviceClass is the DeviceClass the chart creates for the driver.
const DRADeviceClass = "vram.vramslice.io"

// draKubelet is the kubelet's DRA side of a hollow node: the kubelet's real DRA manager
// (pkg/kubelet/cm/dra, claim cache checkpointed in StateDir) and the kubelet's real plugin
// manager (pkg/kubelet/pluginmanager: the plugin watcher on RegistryDir plus the reconciler
// that calls GetInfo / NotifyRegistrationStatus on a registration socket and hands a
// "DRAPlugin" to the DRA manager's registration handler).
type draKubelet struct {
	mu     sync.Mutex
	mgr    *dra.Manager
	cancel context.CancelFunc
	done   sync.WaitGroup
}

// RegistryDir is the node's kubelet plugin registration directory (plugins_registry).
func (h *HollowNode) RegistryDir() string { return filepath.Join(h.Dir, "plugins_registry") }

// DRAPluginDir is where the node agent serves its DRA socket (dra.sock).
func (h *HollowNode) DRAPluginDir() string { return filepath.Join(h.Dir, "plugins", DRADriver) }

// CDIDir is where the node agent writes the CDI specs of prepared claims.
func (h *HollowNode) CDIDir() string { return filepath.Join(h.Dir, "cdi") }

// DRAStateDir holds the kubelet DRA manager's checkpoint (dra_manager_state).
func (h *HollowNode) DRAStateDir() string { return filepath.Join(h.Dir, "kubelet-dra") }

// startDRA starts the DRA manager and the plugin manager watching RegistryDir.
func (h *HollowNode) startDRA(parent context.Context) error {
	for _, d := range []string{h.RegistryDir(), h.DRAPluginDir(), h.CDIDir(), h.DRAStateDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("node %s: %w", h.Name, err)
		}
	}
	logger := h.logger.WithName("dra")
	mgr, err := dra.NewManager(logger, h.client, h.DRAStateDir())
	if err != nil {
		return fmt.Errorf("node %s DRA manager: %w", h.Name, err)
	}
	ctx, cancel := context.WithCancel(klog.NewContext(parent, logger))
	getNode := func(ctx context.Context) (*v1.Node, error) {
		return h.client.CoreV1().Nodes().Get(ctx, h.Name, metav1.GetOptions{})
	}
	// A starting DRA manager deletes the node's ResourceSlices in the background (the kubelet
	// does not advertise drivers that have not registered since it started). Wait for that to
	// happen before the agent publishes, or it could wipe the agent's first slice: a sentinel
	// slice of this node is created first and must be gone.
	sentinel := &resourcev1.ResourceSlice{
		ObjectMeta: metav1.ObjectMeta{Name: h.Name + "-e2e-startup-wipe"},
		Spec: resourcev1.ResourceSliceSpec{Driver: "e2e.vramslice.io", NodeName: &h.Name,
			Pool: resourcev1.ResourcePool{Name: h.Name, Generation: 1, ResourceSliceCount: 1}},
	}
	if _, err := h.client.ResourceV1().ResourceSlices().Create(parent, sentinel, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		cancel()
		return fmt.Errorf("node %s: startup-wipe sentinel slice: %w", h.Name, err)
	}
	if err := mgr.Start(ctx, h.activePods, getNode, readySources{}); err != nil {
		cancel()
		return fmt.Errorf("node %s DRA manager start: %w", h.Name, err)
	}
	if err := waitFor(parent, 30*time.Second, 50*time.Millisecond, "the DRA manager's startup wipe of "+h.Name+"'s ResourceSlices", func() (bool, error) {
		_, err := h.client.ResourceV1().ResourceSlices().Get(parent, sentinel.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return false, err
	}); err != nil {
		cancel()
		mgr.Stop()
		return err
	}
	k := &draKubelet{mgr: mgr, cancel: cancel}
	k.done.Add(1)
	if DRARegistration() == "pluginmanager" {
		pm := pluginmanager.NewPluginManager(h.RegistryDir(), &record.FakeRecorder{})
		pm.AddHandler(registerapi.DRAPlugin, mgr.GetWatcherHandler())
		go func() { defer k.done.Done(); pm.Run(ctx, readySources{}, ctx.Done()) }()
	} else {
		go func() { defer k.done.Done(); h.registerDRAPlugins(ctx, mgr.GetWatcherHandler()) }()
	}
	h.mu.Lock()
	h.draK = k
	h.mu.Unlock()
	return nil
}

// DRADriverRegistered reports whether the node's DRA manager has the driver registered (the
// kubelet answers "DRA driver ... is not registered" to every prepare until it has). An error
// means the question cannot be asked: the kubelet's DRA manager no longer offers GetPlugin.
func (h *HollowNode) DRADriverRegistered(driver string) (bool, error) {
	h.mu.Lock()
	k := h.draK
	h.mu.Unlock()
	if k == nil {
		return false, nil
	}
	plugins, ok := k.mgr.GetWatcherHandler().(interface {
		GetPlugin(driverName string) (*draplugin.DRAPlugin, error)
	})
	if !ok {
		return false, fmt.Errorf("the kubelet's DRA plugin store %T has no GetPlugin: the Kubernetes modules changed", k.mgr.GetWatcherHandler())
	}
	_, err := plugins.GetPlugin(driver)
	return err == nil, nil
}

// registrationHint says what to check when a driver never registers: the kubelet's plugin
// manager watches the registry directory with one inotify instance per node, and the
// machine's limit may be below the number of DRA nodes.
func registrationHint() string {
	if DRARegistration() != "pluginmanager" {
		return "registration: " + DRARegistration()
	}
	limit := "unknown"
	if b, err := os.ReadFile("/proc/sys/fs/inotify/max_user_instances"); err == nil {
		limit = strings.TrimSpace(string(b))
	}
	return "the kubelet's plugin manager needs an inotify instance per node and fs.inotify.max_user_instances is " +
		limit + "; VRAMSLICE_E2E_DRA_REGISTRATION=direct registers without one"
}

// stopDRA stops the plugin manager and the DRA manager (their files stay, as when a kubelet stops).
func (h *HollowNode) stopDRA() {
	h.mu.Lock()
	k := h.draK
	h.draK = nil
	h.mu.Unlock()
	if k == nil {
		return
	}
	k.cancel()
	k.done.Wait()
	k.mgr.Stop()
}

// StopDRAForTest stops the DRA manager and the plugin manager without starting new ones
// (a test can then change the state directory before RestartDRAManager).
func (h *HollowNode) StopDRAForTest() { h.stopDRA() }

// RestartDRAManager stops the DRA manager and the plugin manager and starts new ones on the
// same directories, as a kubelet restart does: the claim cache is read back from the
// checkpoint, and the plugin manager finds the registration socket again.
func (h *HollowNode) RestartDRAManager(ctx context.Context) error {
	h.stopDRA()
	return h.startDRA(ctx)
}

// draManager returns the node's DRA manager (nil when the node runs without DRA).
func (h *HollowNode) draManager() *dra.Manager {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.draK == nil {
		return nil
	}
	return h.draK.mgr
}

// PrepareClaims calls the DRA manager's PrepareResources for pod, as the kubelet does at
// admission, and returns each container's CDI device names (GetResources). Exported for
// tests that check what a second prepare returns (after a restart).
func (h *HollowNode) PrepareClaims(ctx context.Context, pod *v1.Pod) (map[string][]string, error) {
	mgr := h.draManager()
	if mgr == nil || len(pod.Spec.ResourceClaims) == 0 {
		return nil, nil
	}
	if err := mgr.PrepareResources(ctx, pod); err != nil {
		return nil, err
	}
	out := map[string][]string{}
	containers := append(append([]v1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...)
	for i := range containers {
		info, err := mgr.GetResources(pod, &containers[i])
		if err != nil {
			return nil, err
		}
		for _, d := range info.CDIDevices {
			out[containers[i].Name] = append(out[containers[i].Name], d.Name)
		}
	}
	return out, nil
}

// unprepareClaims calls UnprepareResources for a pod that stopped, as the kubelet does once
// its containers are gone.
func (h *HollowNode) unprepareClaims(ctx context.Context, pod *v1.Pod) error {
	mgr := h.draManager()
	if mgr == nil || pod == nil || len(pod.Spec.ResourceClaims) == 0 {
		return nil
	}
	return mgr.UnprepareResources(ctx, pod)
}
