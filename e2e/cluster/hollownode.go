package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
)

// RunOptionsAnnotation is the pod annotation where a hollow node records what the
// kubelet's device manager would hand the container runtime (JSON of PodRunOptions).
const RunOptionsAnnotation = "e2e.vramslice.io/run-options"

// InitRunningAnnotation set to "true" on a pod keeps it initialising: a hollow node admits it
// (the device manager allocates for every container, init ones first, as the kubelet does)
// and reports its init containers running and the pod Pending, as a kubelet does while a
// long init container (a model download) runs.
const InitRunningAnnotation = "e2e.vramslice.io/init-running"

// ContainerRunOptions is what GetDeviceRunContainerOptions returned for one container.
type ContainerRunOptions struct {
	Env         map[string]string `json:"env,omitempty"`
	Mounts      []MountOption     `json:"mounts,omitempty"`
	Devices     []string          `json:"devices,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	CDIDevices  []string          `json:"cdiDevices,omitempty"`
}

// MountOption is one mount from a device plugin's Allocate response.
type MountOption struct {
	ContainerPath string `json:"containerPath"`
	HostPath      string `json:"hostPath"`
	ReadOnly      bool   `json:"readOnly"`
}

// PodRunOptions maps container name to its run options.
type PodRunOptions map[string]ContainerRunOptions

type readySources struct{}

func (readySources) AddSource(string) {}
func (readySources) AllReady() bool   { return true }

// HollowNode is a Node object plus the kubelet's real device manager on its own
// socket directory, a PodResources v1 server, and just enough of the kubelet's
// pod lifecycle (admission → Running, deletion → free devices) for vramslice.
type HollowNode struct {
	Name string
	// Dir holds device-plugins/ (registration socket and checkpoint) and pod-resources/.
	Dir string

	client kubernetes.Interface
	// logger is what the kubelet code gets (its calls take a logger or a context):
	// klog's, with the node's name.
	logger klog.Logger

	// mu guards only the dm pointer (swapped by RestartDeviceManager). The device
	// manager is internally synchronised like in the kubelet; holding a lock of ours
	// across Allocate would deadlock a plugin that calls PodResources from Allocate.
	// Admission is serial anyway: one pod worker per node, like the kubelet's sync loop.
	mu       sync.Mutex
	dm       *devicemanager.ManagerImpl
	draK     *draKubelet // the kubelet's DRA manager + plugin manager (DRA nodes only); guarded by mu
	activeMu sync.Mutex  // guards active; separate from mu because the device manager calls activePods while we hold mu
	active   map[types.UID]*v1.Pod
	lastCap  string

	queue    workqueue.TypedRateLimitingInterface[string]
	informer cache.SharedIndexInformer
	grpc     *grpc.Server
	cancel   context.CancelFunc
	done     sync.WaitGroup
}

// SocketDir is where plugins register (kubelet.sock) and serve their sockets.
func (h *HollowNode) SocketDir() string { return filepath.Join(h.Dir, "device-plugins") }

// PodResourcesSocket is the PodResources v1 gRPC socket of this node.
func (h *HollowNode) PodResourcesSocket() string {
	return filepath.Join(h.Dir, "pod-resources", "kubelet.sock")
}

var baseCapacity = v1.ResourceList{
	v1.ResourceCPU:    resource.MustParse("256"),
	v1.ResourceMemory: resource.MustParse("1Ti"),
	v1.ResourcePods:   resource.MustParse("500"),
}

// startHollowNode registers the Node, starts the device manager, the PodResources
// server, the status loop and the pod worker; withDRA also starts the kubelet's DRA
// manager and plugin manager (dra.go).
func startHollowNode(ctx context.Context, client kubernetes.Interface, name, dir string, withDRA bool) (*HollowNode, error) {
	h := &HollowNode{Name: name, Dir: dir, client: client, active: map[types.UID]*v1.Pod{},
		logger: klog.Background().WithValues("node", name)}
	for _, d := range []string{h.SocketDir(), filepath.Dir(h.PodResourcesSocket())} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("node %s: %w", name, err)
		}
	}
	if err := h.registerNode(ctx); err != nil {
		return nil, err
	}
	if err := h.startDeviceManager(); err != nil {
		return nil, err
	}
	if err := h.servePodResources(); err != nil {
		return nil, err
	}
	if withDRA {
		if err := h.startDRA(ctx); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	h.cancel = cancel
	h.queue = workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())
	factory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", name).String()
	}))
	h.informer = factory.Core().V1().Pods().Informer()
	enqueue := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			h.queue.Add(key)
		}
	}
	if _, err := h.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, n any) { enqueue(n) },
		DeleteFunc: enqueue,
	}); err != nil {
		return nil, err
	}
	factory.Start(ctx.Done())
	h.done.Add(2)
	go func() { defer h.done.Done(); h.podWorker(ctx) }()
	go func() { defer h.done.Done(); h.statusLoop(ctx) }()
	go func() { <-ctx.Done(); h.queue.ShutDown() }()
	return h, nil
}

func (h *HollowNode) registerNode(ctx context.Context) error {
	node := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: h.Name, Labels: map[string]string{
			"kubernetes.io/hostname": h.Name, "kubernetes.io/os": "linux", "e2e.vramslice.io/hollow": "true",
		}},
	}
	created, err := h.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		created, err = h.client.CoreV1().Nodes().Get(ctx, h.Name, metav1.GetOptions{})
	}
	if err != nil {
		return fmt.Errorf("registering node %s: %w", h.Name, err)
	}
	// The TaintNodesByCondition admission plugin taints new nodes not-ready; the
	// node lifecycle controller (not run here) would lift it once Ready.
	if len(created.Spec.Taints) > 0 {
		created.Spec.Taints = nil
		if created, err = h.client.CoreV1().Nodes().Update(ctx, created, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("untainting node %s: %w", h.Name, err)
		}
	}
	now := metav1.Now()
	created.Status.Capacity = baseCapacity.DeepCopy()
	created.Status.Allocatable = baseCapacity.DeepCopy()
	created.Status.Conditions = []v1.NodeCondition{{
		Type: v1.NodeReady, Status: v1.ConditionTrue, Reason: "KubeletReady",
		Message: "hollow node with the kubelet's device manager", LastHeartbeatTime: now, LastTransitionTime: now,
	}}
	created.Status.Addresses = []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: "127.0.0.1"}, {Type: v1.NodeHostName, Address: h.Name}}
	if _, err := h.client.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("node %s status: %w", h.Name, err)
	}
	return nil
}

// startDeviceManager creates and starts a fresh device manager (the kubelet does
// this at every start: it deletes stale sockets and reads its checkpoint).
func (h *HollowNode) startDeviceManager() error {
	dm, err := newManagerImpl(h.logger, filepath.Join(h.SocketDir(), "kubelet.sock"), nil, topologymanager.NewFakeManager(h.logger))
	if err != nil {
		return fmt.Errorf("node %s device manager: %w", h.Name, err)
	}
	if err := dm.Start(h.logger, h.activePods, readySources{}, containermap.NewContainerMap(), sets.New[string]()); err != nil {
		return fmt.Errorf("node %s device manager start: %w", h.Name, err)
	}
	h.mu.Lock()
	h.dm = dm
	h.mu.Unlock()
	return nil
}

// RestartDeviceManager stops the device manager and starts a new one on the same
// directory, as a kubelet restart does: kubelet.sock is re-created, plugin sockets
// are removed, and plugins must register again.
func (h *HollowNode) RestartDeviceManager() error {
	h.mu.Lock()
	old := h.dm
	h.mu.Unlock()
	if err := old.Stop(h.logger); err != nil {
		return fmt.Errorf("node %s stopping device manager: %w", h.Name, err)
	}
	return h.startDeviceManager()
}

// activePods is the device manager's view of pods admitted to this node.
func (h *HollowNode) activePods() []*v1.Pod { return h.snapshotActive() }

// manager returns the current device manager.
func (h *HollowNode) manager() *devicemanager.ManagerImpl {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.dm
}

func (h *HollowNode) snapshotActive() []*v1.Pod {
	h.activeMu.Lock()
	defer h.activeMu.Unlock()
	out := make([]*v1.Pod, 0, len(h.active))
	for _, p := range h.active {
		out = append(out, p)
	}
	return out
}

func (h *HollowNode) setActive(p *v1.Pod, on bool) {
	h.activeMu.Lock()
	defer h.activeMu.Unlock()
	if on {
		h.active[p.UID] = p
	} else {
		delete(h.active, p.UID)
	}
}

func (h *HollowNode) isActive(uid types.UID) bool {
	h.activeMu.Lock()
	defer h.activeMu.Unlock()
	_, ok := h.active[uid]
	return ok
}

// Stop ends the node's loops, its PodResources server and its device manager.
func (h *HollowNode) Stop() {
	if h.cancel != nil {
		h.cancel()
	}
	h.done.Wait()
	h.stopDRA()
	if h.grpc != nil {
		h.grpc.Stop()
	}
	if dm := h.manager(); dm != nil {
		_ = dm.Stop(h.logger)
	}
}

func (h *HollowNode) podWorker(ctx context.Context) {
	for {
		key, shutdown := h.queue.Get()
		if shutdown {
			return
		}
		err := h.syncPod(ctx, key)
		if err != nil && ctx.Err() == nil {
			klog.V(2).InfoS("hollow node sync failed; retrying", "node", h.Name, "pod", key, "err", err)
			h.queue.AddRateLimited(key)
		} else {
			h.queue.Forget(key)
		}
		h.queue.Done(key)
	}
}

// freeDevices drops a stopped pod from the active pods, lets the device manager free its
// units and has the DRA manager unprepare its claims (the kubelet's order: containers gone,
// then devices and claims released).
func (h *HollowNode) freeDevices(ctx context.Context, pod *v1.Pod) error {
	h.setActive(pod, false)
	h.manager().UpdateAllocatedDevices(h.logger)
	if err := h.unprepareClaims(klog.NewContext(ctx, h.logger), pod); err != nil {
		return fmt.Errorf("unpreparing the claims of %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return nil
}

func (h *HollowNode) syncPod(ctx context.Context, key string) error {
	obj, exists, err := h.informer.GetIndexer().GetByKey(key)
	if err != nil {
		return err
	}
	if !exists {
		// Deleted: free whatever this key held. We do not know the UID any more,
		// so drop every active pod with this namespace/name.
		for _, p := range h.snapshotActive() {
			if p.Namespace+"/"+p.Name == key {
				if err := h.freeDevices(ctx, p); err != nil {
					return err
				}
			}
		}
		return nil
	}
	pod := obj.(*v1.Pod)
	if pod.DeletionTimestamp != nil {
		if err := h.freeDevices(ctx, pod); err != nil {
			return err
		}
		zero := int64(0)
		err := h.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
			GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &pod.UID},
		})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return err
		}
		return nil
	}
	if pod.Status.Phase != v1.PodPending && pod.Status.Phase != "" {
		if pod.Status.Phase == v1.PodFailed || pod.Status.Phase == v1.PodSucceeded {
			return h.freeDevices(ctx, pod)
		}
		return nil
	}
	if h.isActive(pod.UID) {
		return nil // admitted, status write pending in the informer
	}
	return h.admit(ctx, pod)
}

// admit does what the kubelet does for a new pod as far as devices go.
func (h *HollowNode) admit(ctx context.Context, pod *v1.Pod) error {
	h.setActive(pod, true)
	dm := h.manager()
	dmCtx := klog.NewContext(ctx, h.logger)
	var allocErr error
	opts := PodRunOptions{}
	// DRA first, as the kubelet prepares a pod's claims before its containers get devices.
	cdi, allocErr := h.PrepareClaims(dmCtx, pod)
	if allocErr != nil {
		// The kubelet retries PrepareResources on the next sync; so do we (the pod stays Pending).
		h.setActive(pod, false)
		klog.InfoS("hollow node could not prepare the pod's claims; retrying", "node", h.Name, "pod", klog.KObj(pod), "err", allocErr)
		return fmt.Errorf("preparing claims: %w", allocErr)
	}
	containers := append(append([]v1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...)
	for i := range containers {
		if allocErr = dm.Allocate(dmCtx, pod, &containers[i], lifecycle.AddOperation); allocErr != nil {
			break
		}
	}
	if allocErr == nil {
		for i := range containers {
			ro, err := dm.GetDeviceRunContainerOptions(dmCtx, pod, &containers[i])
			if err != nil {
				allocErr = err
				break
			}
			o := toRunOptions(ro)
			o.CDIDevices = append(o.CDIDevices, cdi[containers[i].Name]...)
			opts[containers[i].Name] = o
		}
	}
	if allocErr != nil {
		_ = h.freeDevices(ctx, pod)
		klog.InfoS("hollow node rejected pod", "node", h.Name, "pod", klog.KObj(pod), "err", allocErr)
		return h.failPod(ctx, pod, allocErr)
	}
	if err := h.markRunning(ctx, pod, opts); err != nil {
		_ = h.freeDevices(ctx, pod)
		return err
	}
	return nil
}

func toRunOptions(ro *devicemanager.DeviceRunContainerOptions) ContainerRunOptions {
	out := ContainerRunOptions{}
	if ro == nil {
		return out
	}
	for _, e := range ro.Envs {
		if out.Env == nil {
			out.Env = map[string]string{}
		}
		out.Env[e.Name] = e.Value
	}
	for _, m := range ro.Mounts {
		out.Mounts = append(out.Mounts, MountOption{ContainerPath: m.ContainerPath, HostPath: m.HostPath, ReadOnly: m.ReadOnly})
	}
	for _, d := range ro.Devices {
		out.Devices = append(out.Devices, d.PathOnHost+":"+d.PathInContainer+":"+d.Permissions)
	}
	for _, a := range ro.Annotations {
		if out.Annotations == nil {
			out.Annotations = map[string]string{}
		}
		out.Annotations[a.Name] = a.Value
	}
	for _, c := range ro.CDIDevices {
		out.CDIDevices = append(out.CDIDevices, c.Name)
	}
	return out
}

// markRunning records the run options and marks the pod Running in one merge patch
// of pods/status, as the kubelet's status manager writes a pod's status: one request
// per start, with the pod's UID in the patch as a precondition (a pod deleted and
// re-created under the same name is not touched). pods/status takes metadata
// changes other than owner references, so the run-options annotation rides along.
func (h *HollowNode) markRunning(ctx context.Context, pod *v1.Pod, opts PodRunOptions) error {
	raw, err := json.Marshal(opts)
	if err != nil {
		return err
	}
	now := metav1.Now()
	if pod.Annotations[InitRunningAnnotation] == "true" {
		return h.patchStatus(ctx, pod, raw, initialising(pod, now))
	}
	status := v1.PodStatus{Phase: v1.PodRunning, HostIP: "127.0.0.1", PodIP: "10.244.0.1", StartTime: &now}
	for _, t := range []v1.PodConditionType{v1.PodScheduled, v1.PodInitialized, v1.ContainersReady, v1.PodReady} {
		status.Conditions = append(status.Conditions, v1.PodCondition{Type: t, Status: v1.ConditionTrue, LastTransitionTime: now})
	}
	for _, c := range pod.Spec.Containers {
		status.ContainerStatuses = append(status.ContainerStatuses, v1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: "hollow://" + c.Image, Ready: true,
			ContainerID: "hollow://" + string(pod.UID) + "/" + c.Name,
			State:       v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: now}},
		})
	}
	return h.patchStatus(ctx, pod, raw, status)
}

// initialising is the status of a pod whose init containers run: Pending, not initialised,
// its app containers waiting.
func initialising(pod *v1.Pod, now metav1.Time) v1.PodStatus {
	status := v1.PodStatus{Phase: v1.PodPending, HostIP: "127.0.0.1", PodIP: "10.244.0.1", StartTime: &now}
	status.Conditions = []v1.PodCondition{
		{Type: v1.PodScheduled, Status: v1.ConditionTrue, LastTransitionTime: now},
		{Type: v1.PodInitialized, Status: v1.ConditionFalse, Reason: "ContainersNotInitialized", LastTransitionTime: now},
	}
	for _, c := range pod.Spec.InitContainers {
		status.InitContainerStatuses = append(status.InitContainerStatuses, v1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: "hollow://" + c.Image,
			ContainerID: "hollow://" + string(pod.UID) + "/" + c.Name,
			State:       v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: now}},
		})
	}
	for _, c := range pod.Spec.Containers {
		status.ContainerStatuses = append(status.ContainerStatuses, v1.ContainerStatus{
			Name: c.Name, Image: c.Image,
			State: v1.ContainerState{Waiting: &v1.ContainerStateWaiting{Reason: "PodInitializing"}},
		})
	}
	return status
}

// patchStatus writes the run options and a status in one merge patch of pods/status.
func (h *HollowNode) patchStatus(ctx context.Context, pod *v1.Pod, raw []byte, status v1.PodStatus) error {
	patch, err := json.Marshal(map[string]any{
		"metadata": map[string]any{"uid": pod.UID, "annotations": map[string]string{RunOptionsAnnotation: string(raw)}},
		"status":   status,
	})
	if err != nil {
		return err
	}
	_, err = h.client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, patch, metav1.PatchOptions{}, "status")
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil // deleted, or re-created under the same name: the informer brings what is next
	}
	if err != nil {
		return fmt.Errorf("marking the pod Running: %w", err)
	}
	return nil
}

// failPod rejects a pod at admission the way the kubelet does (phase Failed,
// reason UnexpectedAdmissionError) and emits an Event.
func (h *HollowNode) failPod(ctx context.Context, pod *v1.Pod, cause error) error {
	cur, err := h.client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	cur.Status.Phase = v1.PodFailed
	cur.Status.Reason = "UnexpectedAdmissionError"
	cur.Status.Message = "Allocate failed due to " + cause.Error()
	if _, err := h.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, cur, metav1.UpdateOptions{}); err != nil {
		return err
	}
	ev := &v1.Event{
		ObjectMeta:     metav1.ObjectMeta{GenerateName: pod.Name + ".", Namespace: pod.Namespace},
		InvolvedObject: v1.ObjectReference{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID, APIVersion: "v1"},
		Reason:         "UnexpectedAdmissionError", Message: cur.Status.Message, Type: v1.EventTypeWarning,
		Source: v1.EventSource{Component: "kubelet", Host: h.Name}, FirstTimestamp: metav1.Now(), LastTimestamp: metav1.Now(), Count: 1,
	}
	_, _ = h.client.CoreV1().Events(pod.Namespace).Create(ctx, ev, metav1.CreateOptions{})
	return nil
}

// statusLoop copies the device manager's capacity and allocatable into Node status.
func (h *HollowNode) statusLoop(ctx context.Context) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		capacity, allocatable, removed := h.manager().GetCapacity(h.logger)
		key := fmt.Sprint(sortedList(capacity), sortedList(allocatable), removed)
		if key == h.lastCap {
			continue
		}
		if err := h.updateNodeStatus(ctx, capacity, allocatable, removed); err != nil {
			if ctx.Err() == nil {
				klog.V(2).InfoS("hollow node status update failed", "node", h.Name, "err", err)
			}
			continue
		}
		h.lastCap = key
	}
}

func sortedList(l v1.ResourceList) string {
	keys := make([]string, 0, len(l))
	for k, v := range l {
		keys = append(keys, string(k)+"="+v.String())
	}
	sort.Strings(keys)
	return fmt.Sprint(keys)
}

func (h *HollowNode) updateNodeStatus(ctx context.Context, capacity, allocatable v1.ResourceList, removed []string) error {
	node, err := h.client.CoreV1().Nodes().Get(ctx, h.Name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	node.Status.Capacity = baseCapacity.DeepCopy()
	node.Status.Allocatable = baseCapacity.DeepCopy()
	for k, v := range capacity {
		node.Status.Capacity[k] = v
	}
	for k, v := range allocatable {
		node.Status.Allocatable[k] = v
	}
	for _, r := range removed {
		delete(node.Status.Capacity, v1.ResourceName(r))
		delete(node.Status.Allocatable, v1.ResourceName(r))
	}
	_, err = h.client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	return err
}
