// Command vramslice-cluster starts the local e2e cluster (etcd, kube-apiserver,
// kube-scheduler "vramslice-scheduler" with vramslice-extender, hollow GPU nodes
// running the kubelet's real device manager and our device plugin), optionally
// applies pod YAMLs, prints `kubectl get gpunodes -o wide` and where each pod
// landed, and stays up until Ctrl-C (then cleans up).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vramslice/vramslice/e2e/cluster"
)

const defaultNodes = "gpu-node-a=NVIDIA A100-SXM4-80GB:80Gi,NVIDIA A100-SXM4-80GB:80Gi;gpu-node-b=NVIDIA L4:24Gi"

func main() {
	var (
		nodesSpec  = flag.String("nodes", defaultNodes, "hollow nodes: name=MODEL:SIZE,MODEL:SIZE;name2=...")
		apply      = flag.String("apply", "", "pod YAML file or directory of *.yaml to apply (namespace default)")
		dir        = flag.String("dir", "", "work directory (default: a new temp dir, removed on exit)")
		binDir     = flag.String("bin-dir", "", "directory with vramslice-device-plugin and vramslice-extender (default <repo>/target/debug)")
		noPlugins  = flag.Bool("control-plane-only", false, "start only etcd, kube-apiserver and kube-scheduler")
		noExtender = flag.Bool("no-extender", false, "do not start vramslice-extender (pods needing it stay Pending)")
		exitAfter  = flag.Bool("exit", false, "print the report and exit instead of waiting for Ctrl-C")
		settle     = flag.Duration("settle", 60*time.Second, "how long to wait for applied pods to be placed before printing")
		storyMode  = flag.Bool("story", false, "after the report, show live usage at work: running pods use memory on their fake GPUs (annotation "+usageAnnotation+"), a process outside Kubernetes steers the next pod away, a pod past its limit draws the watchdog's Event")
	)
	// klog's flags (-v=N for the in-process Kubernetes components) are already registered by an imported package.
	flag.Parse()
	if err := run(*nodesSpec, *apply, *dir, *binDir, *noPlugins, *noExtender, *exitAfter, *storyMode, *settle); err != nil {
		fmt.Fprintln(os.Stderr, "vramslice-cluster:", err)
		os.Exit(1)
	}
}

func parseNodes(spec string) (map[string][]cluster.FakeGPU, []string, error) {
	out := map[string][]cluster.FakeGPU{}
	var order []string
	for _, part := range strings.Split(spec, ";") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, gpus, ok := strings.Cut(part, "=")
		if !ok || name == "" {
			return nil, nil, fmt.Errorf("bad node spec %q: want name=MODEL:SIZE,...", part)
		}
		for i, g := range strings.Split(gpus, ",") {
			model, size, ok := strings.Cut(g, ":")
			if !ok {
				return nil, nil, fmt.Errorf("bad GPU spec %q in node %s: want MODEL:SIZE", g, name)
			}
			out[name] = append(out[name], cluster.GPU(name, i, model, size))
		}
		order = append(order, name)
	}
	if len(order) == 0 {
		return nil, nil, errors.New("no nodes given")
	}
	return out, order, nil
}

func run(nodesSpec, apply, dir, binDir string, controlPlaneOnly, noExtender, exitAfter, storyMode bool, settle time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	nodes, order, err := parseNodes(nodesSpec)
	if err != nil {
		return err
	}
	start := time.Now()
	c, err := cluster.Start(ctx, cluster.Options{Dir: dir, BinDir: binDir})
	if err != nil {
		return err
	}
	defer c.StopQuietly()
	fmt.Printf("control plane up in %s (etcd, kube-apiserver, kube-scheduler %q)\n", time.Since(start).Round(time.Millisecond), cluster.SchedulerName)
	if !controlPlaneOnly {
		if !noExtender {
			if err := c.StartExtender(); err != nil {
				return err
			}
			fmt.Printf("vramslice-extender ready at %s\n", c.ExtenderURL)
		}
		for _, name := range order {
			if _, err := c.AddNode(name, nodes[name]); err != nil {
				return err
			}
			fmt.Printf("hollow node %s up with %d fake GPU(s); device plugin started\n", name, len(nodes[name]))
		}
		if err := c.WaitNodesAdvertise(ctx, order, 60*time.Second); err != nil {
			return err
		}
	}
	if apply != "" {
		files := []string{apply}
		if st, err := os.Stat(apply); err == nil && st.IsDir() {
			files, _ = filepath.Glob(filepath.Join(apply, "*.yaml"))
			sort.Strings(files)
		}
		for _, f := range files {
			if _, err := c.Applier.ApplyFile(ctx, f, "default"); err != nil {
				return err
			}
			fmt.Printf("applied %s\n", f)
		}
		waitSettled(ctx, c, settle)
		waitPublished(ctx, c, 40*time.Second)
	}
	fmt.Println()
	fmt.Println("$ kubectl get gpunodes -o wide")
	if err := c.PrintGpuNodesWide(ctx, os.Stdout); err != nil {
		return err
	}
	fmt.Println()
	fmt.Println("Pods (namespace default):")
	if err := c.PrintPlacements(ctx, os.Stdout, "default"); err != nil {
		return err
	}
	if storyMode && !controlPlaneOnly && !noExtender {
		fmt.Println()
		fmt.Println("Live usage at work (GpuNode status, as the device plugins publish it):")
		// Usage keeps moving while the cluster runs; it stops before the cluster does.
		storyCtx, stopStory := context.WithCancel(ctx)
		defer stopStory()
		if err := story(storyCtx, c, os.Stdout); err != nil {
			fmt.Printf("the story stopped: %v\n", err)
			if exitAfter {
				return err
			}
		}
	}
	fmt.Println()
	fmt.Printf("KUBECONFIG=%s\n", c.AdminKubeconfig)
	if exe, err := os.Executable(); err == nil {
		if kubectl := filepath.Join(filepath.Dir(exe), "kubectl"); fileExists(kubectl) {
			fmt.Printf("try: %s --kubeconfig %s get gpunodes -o wide\n", kubectl, c.AdminKubeconfig)
		}
	}
	fmt.Printf("work dir: %s (logs under logs/)\n", c.Dir)
	if exitAfter {
		return nil
	}
	fmt.Printf("kubelet restart: kill -USR1 %d restarts every hollow node's device manager\n", os.Getpid())
	fmt.Println("cluster is running; Ctrl-C stops it and cleans up")
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	for {
		select {
		case <-ctx.Done():
			fmt.Println("stopping...")
			return nil
		case <-usr1:
			for _, n := range c.Nodes() {
				if err := n.RestartDeviceManager(); err != nil {
					fmt.Printf("restarting the device manager of %s: %v\n", n.Name, err)
					continue
				}
				fmt.Printf("restarted the device manager of %s (kubelet.sock re-created; the plugin must re-register)\n", n.Name)
			}
		}
	}
}

// waitSettled waits until every pod is Running, Failed, or Pending with a
// scheduling verdict (PodScheduled=False), or the timeout passes.
func waitSettled(ctx context.Context, c *cluster.Cluster, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		pods, err := c.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
		if err == nil {
			settled := true
			for _, p := range pods.Items {
				if p.Status.Phase == v1.PodRunning || p.Status.Phase == v1.PodFailed {
					continue
				}
				unsched := false
				for _, cond := range p.Status.Conditions {
					// A failed bind (a race lost to another pod) is retried; only a filter verdict settles.
					if cond.Type == v1.PodScheduled && cond.Status == v1.ConditionFalse && !strings.Contains(cond.Message, "cannot bind") {
						unsched = true
					}
				}
				if !unsched {
					settled = false
				}
			}
			if settled {
				return
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// waitPublished waits until every GpuNode's allocated units equal the units of
// the running pods on its node (the device plugins publish allocation changes
// with their next reading or heartbeat).
func waitPublished(ctx context.Context, c *cluster.Cluster, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	said := false
	for time.Now().Before(deadline) && ctx.Err() == nil {
		pods, err := c.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
		if err != nil {
			return
		}
		want := map[string]uint64{}
		for _, p := range pods.Items {
			if p.Status.Phase != v1.PodRunning {
				continue
			}
			for _, ctr := range p.Spec.Containers {
				if q, ok := ctr.Resources.Limits[cluster.ResourceName]; ok {
					want[p.Spec.NodeName] += uint64(q.Value())
				}
			}
		}
		agree := true
		for _, n := range c.Nodes() {
			st, err := c.GpuNode(ctx, n.Name)
			if err != nil {
				agree = false
				break
			}
			var got uint64
			for _, g := range st.GPUs {
				got += g.AllocatedUnits
			}
			agree = agree && got == want[n.Name]
		}
		if agree {
			return
		}
		if !said {
			fmt.Println("waiting for the device plugins to publish the new allocations in GpuNode status...")
			said = true
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
