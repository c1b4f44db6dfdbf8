// Package cluster runs a real, local Kubernetes control plane for vramslice's
// end-to-end tests, demo and benchmark: embedded etcd, kube-apiserver (RBAC,
// service accounts) and kube-scheduler built from Kubernetes' own Go modules,
// plus "hollow" GPU nodes that run the kubelet's real device manager. Our Rust
// binaries (device plugin, extender) run as host processes against it under
// the chart's least-privilege service-account identities.
package cluster

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	authenticationv1 "k8s.io/api/authentication/v1"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/klog/v2"
	kubeapiservertesting "k8s.io/kubernetes/cmd/kube-apiserver/app/testing"
)

// Fixed names (see the design contract).
const (
	ResourceName      = "vramslice.io/vram-gib"
	SchedulerName     = "vramslice-scheduler"
	PlainScheduler    = "plain-scheduler"
	SystemNamespace   = "vramslice-system"
	PluginSA          = "vramslice-device-plugin"
	ExtenderSA        = "vramslice-extender"
	ChartSchedulerSA  = "vramslice-scheduler"
	AnnotationGPUUUID = "vramslice.io/gpu-uuid"
)

// Options configure a Cluster.
type Options struct {
	// Dir is the working directory (kubeconfigs, sockets, logs). Empty: a new temp dir, removed on Stop.
	Dir string
	// RepoRoot is the vramslice checkout (for manifests/crds). Empty: found from the working directory.
	RepoRoot string
	// BinDir holds vramslice-device-plugin and vramslice-extender. Empty: $VRAMSLICE_BIN_DIR or <repo>/target/debug.
	BinDir string
	// PlainScheduler also runs a second kube-scheduler (profile "plain-scheduler") without the extender.
	PlainScheduler bool
	// SchedulerProcesses runs each kube-scheduler as a child process (this binary,
	// re-executed; its main must call RunSchedulerProcess first), as in a real
	// cluster, instead of in this process (see schedulerprocess.go).
	SchedulerProcesses bool
	// ExtenderExtraConfig is appended verbatim to the extender's YAML config.
	ExtenderExtraConfig string
	// PluginPollInterval for the device plugins (default 500ms).
	PluginPollInterval string
	// PluginExtraConfig is appended verbatim to each device plugin's YAML config.
	PluginExtraConfig string
	// RBAC picks the identities (default $VRAMSLICE_E2E_RBAC, else "chart"):
	//   "chart":    the RBAC objects of manifests/vramslice.yaml (the chart rendered); device
	//               plugins run as vramslice-device-plugin, the extender and kube-scheduler
	//               as vramslice-scheduler (they share the scheduler pod in the chart);
	//   "testdata": e2e/testdata/rbac.yaml (the minimal rules); plugins as
	//               vramslice-device-plugin, the extender as vramslice-extender, kube-scheduler admin.
	RBAC string
	// DRA prepares the cluster for nodes added with AddDRANode: in "chart" RBAC the objects of
	// manifests/dra/vramslice.yaml (the chart rendered with mode=dra) are applied over those of
	// manifests/vramslice.yaml (kept for the kube-scheduler's identity), and its DeviceClass
	// vram.vramslice.io is applied (both RBAC modes). The slice ValidatingAdmissionPolicy is
	// not: it needs pod-bound tokens (node-name extra), which the harness's tokens are not.
	DRA bool
}

// rbacKinds are the objects taken from the chart's rendered manifests: the identities, their
// RBAC, and the FlowSchema that queues the scheduler's requests where kube-scheduler's go.
var rbacKinds = map[string]bool{"Namespace": true, "ServiceAccount": true, "ClusterRole": true,
	"ClusterRoleBinding": true, "Role": true, "RoleBinding": true, "FlowSchema": true}

// Node is one hollow node with its fake GPUs and its device plugin process.
type Node struct {
	*HollowNode
	FakeGPUFile  string
	PluginConfig string
	Plugin       *Process
	// MetricsURL serves the node agent's /metrics and /healthz (its metricsAddr).
	MetricsURL string
	// DRA: the node agent runs in mode: dra and the hollow node runs the kubelet's DRA manager.
	DRA  bool
	gpus []FakeGPU
}

// Cluster is a running e2e cluster.
type Cluster struct {
	Opts            Options
	Dir             string
	AdminKubeconfig string
	AdminConfig     *rest.Config
	Client          kubernetes.Interface
	Dynamic         dynamic.Interface
	Applier         *Applier
	ExtenderURL     string
	// ExtenderMetricsURL serves the extender's /healthz, /readyz and /metrics (metricsAddr,
	// as the chart runs it); ExtenderURL serves only kube-scheduler's verbs.
	ExtenderMetricsURL string
	Extender           *Process
	// Schedulers are the kube-scheduler child processes (Options.SchedulerProcesses).
	Schedulers []*SchedulerProcess

	mu           sync.Mutex
	nodes        map[string]*Node
	tb           *processTB
	etcd         *embed.Etcd
	api          kubeapiservertesting.TestServer
	cancel       context.CancelFunc
	ctx          context.Context
	ownDir       bool
	extenderPort int
	metricsPort  int
	pluginKC     string
	extenderKC   string
	nextMetrics  int
}

// FindRepoRoot walks up from the working directory to the checkout root
// (the directory holding Cargo.toml and crates/).
func FindRepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if st, err := os.Stat(filepath.Join(dir, "crates")); err == nil && st.IsDir() {
			if _, err := os.Stat(filepath.Join(dir, "Cargo.toml")); err == nil {
				return dir, nil
			}
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no vramslice checkout (Cargo.toml + crates/) above the working directory")
		}
		dir = parent
	}
}

// Start brings the control plane up: etcd, kube-apiserver, the GpuNode CRD, the
// RBAC of e2e/testdata/rbac.yaml, service-account kubeconfigs and kube-scheduler(s).
// Nodes, the extender and plugins are added afterwards.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	logsapi.ReapplyHandling = logsapi.ReapplyHandlingIgnoreUnchanged
	c := &Cluster{Opts: opts, nodes: map[string]*Node{}, tb: newProcessTB("vramslice-e2e")}
	var err error
	if opts.RepoRoot == "" {
		if c.Opts.RepoRoot, err = FindRepoRoot(); err != nil {
			return nil, err
		}
	}
	if c.Opts.BinDir == "" {
		c.Opts.BinDir = os.Getenv("VRAMSLICE_BIN_DIR")
		if c.Opts.BinDir == "" {
			c.Opts.BinDir = filepath.Join(c.Opts.RepoRoot, "target", "debug")
		}
	}
	if c.Opts.RBAC == "" {
		c.Opts.RBAC = os.Getenv("VRAMSLICE_E2E_RBAC")
	}
	if c.Opts.RBAC == "" {
		c.Opts.RBAC = "chart"
	}
	if c.Opts.PluginPollInterval == "" {
		c.Opts.PluginPollInterval = "500ms"
	}
	c.Dir = opts.Dir
	if c.Dir == "" {
		// Short path: unix socket paths must stay under 108 bytes.
		if c.Dir, err = os.MkdirTemp("", "vse2e-"); err != nil {
			return nil, err
		}
		c.ownDir = true
	} else if err := os.MkdirAll(c.Dir, 0o755); err != nil {
		return nil, err
	}
	if err := setupKlog(filepath.Join(c.Dir, "logs", "kubernetes.log")); err != nil {
		return nil, err
	}
	c.ctx, c.cancel = context.WithCancel(ctx)
	ok := false
	defer func() {
		if !ok {
			c.Stop()
		}
	}()

	var etcdURL string
	if c.etcd, etcdURL, err = startEtcd(c.Dir); err != nil {
		return nil, err
	}
	if c.api, err = startAPIServer(c.tb, etcdURL); err != nil {
		return nil, fmt.Errorf("starting kube-apiserver: %w", err)
	}
	ca, err := servingCA(c.api.TmpDir)
	if err != nil {
		return nil, fmt.Errorf("reading the apiserver's serving CA: %w", err)
	}
	server := c.api.ClientConfig.Host
	c.AdminKubeconfig = filepath.Join(c.Dir, "admin.kubeconfig")
	if err := writeKubeconfig(c.AdminKubeconfig, server, ca, "admin", c.api.ClientConfig.BearerToken); err != nil {
		return nil, err
	}
	if c.AdminConfig, c.Client, err = clientFromKubeconfig(c.AdminKubeconfig); err != nil {
		return nil, err
	}
	if c.Dynamic, err = dynamic.NewForConfig(c.AdminConfig); err != nil {
		return nil, err
	}
	if c.Applier, err = NewApplier(c.AdminConfig); err != nil {
		return nil, err
	}
	if _, err := c.Applier.ApplyFile(c.ctx, filepath.Join(c.Opts.RepoRoot, "manifests", "crds", "gpunodes.vramslice.io.yaml"), ""); err != nil {
		return nil, fmt.Errorf("applying the GpuNode CRD: %w", err)
	}
	// No controller-manager runs, so create the service account pods in "default" use.
	for _, ns := range []string{"default", "kube-system", SystemNamespace} {
		if err := c.EnsureNamespace(ns); err != nil {
			return nil, err
		}
	}
	schedulerKC := c.AdminKubeconfig
	extenderSA := ExtenderSA
	switch c.Opts.RBAC {
	case "chart":
		paths := []string{filepath.Join(c.Opts.RepoRoot, "manifests", "vramslice.yaml")}
		if opts.DRA {
			// The kube-scheduler keeps the default rendering's identity (a DRA cluster runs its
			// own kube-scheduler; the mode=dra rendering has no scheduler objects); the node
			// agent's ClusterRole is replaced by the mode=dra one (its DRA rules).
			paths = append(paths, filepath.Join(c.Opts.RepoRoot, "manifests", "dra", "vramslice.yaml"))
		}
		for _, path := range paths {
			data, err := os.ReadFile(path)
			if err != nil {
				return nil, fmt.Errorf("reading the chart's rendered manifests: %w", err)
			}
			if _, err := c.Applier.ApplyYAMLKinds(c.ctx, data, SystemNamespace, rbacKinds); err != nil {
				return nil, fmt.Errorf("applying the chart's RBAC from %s: %w", path, err)
			}
		}
		extenderSA = ChartSchedulerSA
		if schedulerKC, err = c.serviceAccountKubeconfig(server, ca, ChartSchedulerSA); err != nil {
			return nil, err
		}
	case "testdata":
		if _, err := c.Applier.ApplyFile(c.ctx, filepath.Join(c.Opts.RepoRoot, "e2e", "testdata", "rbac.yaml"), ""); err != nil {
			return nil, fmt.Errorf("applying RBAC: %w", err)
		}
	default:
		return nil, fmt.Errorf("unknown RBAC source %q (want chart or testdata)", c.Opts.RBAC)
	}
	if opts.DRA {
		path := filepath.Join(c.Opts.RepoRoot, "manifests", "dra", "vramslice.yaml")
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		if _, err := c.Applier.ApplyYAMLKinds(c.ctx, data, SystemNamespace, map[string]bool{"DeviceClass": true}); err != nil {
			return nil, fmt.Errorf("applying the DeviceClass from %s: %w", path, err)
		}
	}
	if c.pluginKC, err = c.serviceAccountKubeconfig(server, ca, PluginSA); err != nil {
		return nil, err
	}
	if c.extenderKC, err = c.serviceAccountKubeconfig(server, ca, extenderSA); err != nil {
		return nil, err
	}
	if c.extenderPort, err = freePort(); err != nil {
		return nil, err
	}
	c.ExtenderURL = "http://127.0.0.1:" + strconv.Itoa(c.extenderPort)
	if c.metricsPort, err = freePort(); err != nil {
		return nil, err
	}
	c.ExtenderMetricsURL = "http://127.0.0.1:" + strconv.Itoa(c.metricsPort)
	scheds := []SchedulerOptions{{Name: SchedulerName, ExtenderURL: c.ExtenderURL, ResourceName: ResourceName}}
	if opts.PlainScheduler {
		scheds = append(scheds, SchedulerOptions{Name: PlainScheduler})
	}
	for _, so := range scheds {
		if opts.SchedulerProcesses {
			sp, err := startSchedulerProcess(c.ctx, c.Dir, schedulerKC, so)
			if err != nil {
				return nil, err
			}
			c.Schedulers = append(c.Schedulers, sp)
			continue
		}
		errCh, err := startScheduler(c.ctx, c.Dir, schedulerKC, so)
		if err != nil {
			return nil, err
		}
		go func(name string) {
			if err := <-errCh; err != nil && c.ctx.Err() == nil {
				fmt.Fprintf(os.Stderr, "vramslice-e2e: kube-scheduler %s stopped: %v\n", name, err)
			}
		}(so.Name)
	}
	ok = true
	return c, nil
}

// setupKlog sends the in-process Kubernetes components' logs to a file (errors
// included) instead of stderr, at verbosity $VRAMSLICE_E2E_V (default 0; the
// apiserver's test helper would otherwise raise it to 5).
func setupKlog(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	v := os.Getenv("VRAMSLICE_E2E_V")
	if v == "" {
		v = "0"
	}
	// klog's own flags, on a private set (the command line may not carry them all).
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	for name, val := range map[string]string{"v": v, "logtostderr": "false", "alsologtostderr": "false", "stderrthreshold": "FATAL", "one_output": "true"} {
		if err := fs.Set(name, val); err != nil {
			return fmt.Errorf("klog flag %s: %w", name, err)
		}
	}
	if fl := flag.CommandLine.Lookup("v"); fl != nil {
		_ = fl.Value.Set(v)
	}
	klog.LogToStderr(false)
	klog.SetOutput(f)
	return nil
}

// EnsureNamespace creates ns (if missing) and its "default" service account.
func (c *Cluster) EnsureNamespace(ns string) error {
	_, err := c.Client.CoreV1().Namespaces().Create(c.ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("namespace %s: %w", ns, err)
	}
	_, err = c.Client.CoreV1().ServiceAccounts(ns).Create(c.ctx, &v1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("service account %s/default: %w", ns, err)
	}
	return nil
}

// serviceAccountKubeconfig writes a kubeconfig holding a TokenRequest token of sa.
func (c *Cluster) serviceAccountKubeconfig(server string, ca []byte, sa string) (string, error) {
	exp := int64(48 * 3600)
	tr, err := c.Client.CoreV1().ServiceAccounts(SystemNamespace).CreateToken(c.ctx, sa,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for %s: %w", sa, err)
	}
	path := filepath.Join(c.Dir, sa+".kubeconfig")
	if err := writeKubeconfig(path, server, ca, sa, tr.Status.Token); err != nil {
		return "", err
	}
	return path, nil
}

// Context is the cluster's lifetime context.
func (c *Cluster) Context() context.Context { return c.ctx }

// Bin is the path of one of our binaries.
func (c *Cluster) Bin(name string) string { return filepath.Join(c.Opts.BinDir, name) }

// AddNode registers a hollow node with the given fake GPUs and starts its device plugin.
func (c *Cluster) AddNode(name string, gpus []FakeGPU) (*Node, error) {
	n, err := c.AddBareNode(name, gpus)
	if err != nil {
		return nil, err
	}
	if err := c.StartPlugin(name); err != nil {
		return nil, err
	}
	return n, nil
}

// AddBareNode registers a hollow node and writes its fake-GPU file and plugin
// config, without starting the device plugin.
func (c *Cluster) AddBareNode(name string, gpus []FakeGPU) (*Node, error) {
	return c.addBareNode(name, gpus, false)
}

// AddDRANode registers a hollow node that runs the kubelet's DRA manager and starts its
// node agent in mode: dra (the cluster needs Options.DRA for the RBAC and DeviceClass).
func (c *Cluster) AddDRANode(name string, gpus []FakeGPU) (*Node, error) {
	if _, err := c.addBareNode(name, gpus, true); err != nil {
		return nil, err
	}
	if err := c.StartPlugin(name); err != nil {
		return nil, err
	}
	return c.Node(name), nil
}

// WaitDRARegistered waits until the DRA manager of every named node has the driver
// registered: only then can the kubelet side prepare claims (a ResourceSlice alone does not
// say so; the agent writes it either way). The error names the nodes still waiting.
func (c *Cluster) WaitDRARegistered(names []string, timeout time.Duration) error {
	var waiting []string
	err := waitFor(c.ctx, timeout, 100*time.Millisecond, "the DRA managers to register driver "+DRADriver, func() (bool, error) {
		waiting = waiting[:0]
		for _, name := range names {
			n := c.Node(name)
			if n == nil {
				return false, fmt.Errorf("no node %s", name)
			}
			if exited, perr := n.Plugin.Exited(); exited {
				return false, fmt.Errorf("the node agent of %s exited: %v", name, perr)
			}
			registered, rerr := n.DRADriverRegistered(DRADriver)
			if rerr != nil {
				return false, rerr
			}
			if !registered {
				waiting = append(waiting, name)
			}
		}
		return len(waiting) == 0, nil
	})
	if err != nil {
		shown := waiting
		if len(shown) > 10 {
			shown = shown[:10]
		}
		return fmt.Errorf("%w: %d node(s) not registered, e.g. %v (%s)", err, len(waiting), shown, registrationHint())
	}
	return nil
}

func (c *Cluster) addBareNode(name string, gpus []FakeGPU, withDRA bool) (*Node, error) {
	dir := filepath.Join(c.Dir, "n", name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	n := &Node{FakeGPUFile: filepath.Join(dir, "fake-gpus.yaml"), PluginConfig: filepath.Join(dir, "plugin.yaml"), gpus: gpus, DRA: withDRA}
	if err := writeFakeGPUs(n.FakeGPUFile, gpus); err != nil {
		return nil, err
	}
	hn, err := startHollowNode(c.ctx, c.Client, name, dir, withDRA)
	if err != nil {
		return nil, err
	}
	n.HollowNode = hn
	c.mu.Lock()
	c.nodes[name] = n
	c.mu.Unlock()
	if err := c.writePluginConfig(n); err != nil {
		return nil, err
	}
	return n, nil
}

// Node returns a node by name (nil if unknown).
func (c *Cluster) Node(name string) *Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[name]
}

// Nodes returns all hollow nodes.
func (c *Cluster) Nodes() []*Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*Node, 0, len(c.nodes))
	for _, n := range c.nodes {
		out = append(out, n)
	}
	return out
}

// SetGPUs rewrites a node's fake-GPU file (atomically).
func (c *Cluster) SetGPUs(name string, gpus []FakeGPU) error {
	n := c.Node(name)
	if n == nil {
		return fmt.Errorf("no node %s", name)
	}
	c.mu.Lock()
	n.gpus = gpus
	c.mu.Unlock()
	return writeFakeGPUs(n.FakeGPUFile, gpus)
}

// GPUs returns a copy of a node's current fake GPUs.
func (c *Cluster) GPUs(name string) []FakeGPU {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nodes[name]
	if n == nil {
		return nil
	}
	return append([]FakeGPU(nil), n.gpus...)
}

// Stop kills our processes, stops the nodes, the control plane and removes the work dir (if ours).
func (c *Cluster) Stop() {
	// The apiserver's test helper resets klog's flags in its cleanups; keep its
	// shutdown noise in the log file.
	_ = setupKlog(filepath.Join(c.Dir, "logs", "kubernetes.log"))
	c.mu.Lock()
	nodes := make([]*Node, 0, len(c.nodes))
	for _, n := range c.nodes {
		nodes = append(nodes, n)
	}
	ext := c.Extender
	c.mu.Unlock()
	for _, sp := range c.Schedulers {
		sp.Stop()
	}
	ext.Kill()
	for _, n := range nodes {
		n.Plugin.Kill()
	}
	for _, n := range nodes {
		if n.HollowNode != nil {
			n.HollowNode.Stop()
		}
	}
	if c.cancel != nil {
		c.cancel()
	}
	if c.api.TearDownFn != nil {
		c.api.TearDownFn()
	}
	c.tb.runCleanups()
	if c.etcd != nil {
		c.etcd.Close()
	}
	if c.ownDir && os.Getenv("VRAMSLICE_E2E_KEEP") == "" {
		_ = os.RemoveAll(c.Dir)
	}
}

// WaitNodesAdvertise waits until each named node's Node status advertises the
// vram resource (the plugin registered and the device manager saw its devices)
// and its GpuNode exists.
func (c *Cluster) WaitNodesAdvertise(ctx context.Context, names []string, timeout time.Duration) error {
	for _, name := range names {
		n := c.Node(name)
		err := waitFor(ctx, timeout, 100*time.Millisecond, "node "+name+" to advertise "+ResourceName, func() (bool, error) {
			if n != nil && n.Plugin != nil {
				if exited, perr := n.Plugin.Exited(); exited {
					return false, fmt.Errorf("device plugin of %s exited (%v); log tail:\n%s", name, perr, n.Plugin.Tail(3000))
				}
			}
			node, err := c.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			q, ok := node.Status.Allocatable[ResourceName]
			return ok && q.Value() > 0, nil
		})
		if err != nil {
			return err
		}
		err = waitFor(ctx, timeout, 100*time.Millisecond, "GpuNode "+name+" to be published", func() (bool, error) {
			g, err := c.GpuNode(ctx, name)
			return err == nil && len(g.GPUs) > 0, err
		})
		if err != nil {
			if n != nil && n.Plugin != nil {
				return fmt.Errorf("%w; device plugin log tail:\n%s", err, n.Plugin.Tail(3000))
			}
			return err
		}
	}
	return nil
}

// StopQuietly is Stop for command-line programs about to exit: the shutdown
// chatter of the in-process components (etcd client retries on cancelled
// contexts) goes to the Kubernetes log file instead of the terminal. Standard error
// is the terminal again afterwards, so the program's own last words (an error) are seen.
func (c *Cluster) StopQuietly() {
	saved, dupErr := syscall.Dup(2)
	if f, err := os.OpenFile(filepath.Join(c.Dir, "logs", "kubernetes.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err == nil {
		_ = syscall.Dup2(int(f.Fd()), 2)
		defer f.Close()
	}
	c.Stop()
	if dupErr == nil {
		_ = syscall.Dup2(saved, 2)
		_ = syscall.Close(saved)
	}
}
