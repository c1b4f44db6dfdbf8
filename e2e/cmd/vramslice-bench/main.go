// Command vramslice-bench schedules N single-container pods onto M hollow nodes
// with the real kube-scheduler, once through vramslice-scheduler (with
// vramslice-extender: filter, prioritize, bind) and once through a plain
// kube-scheduler profile without the extender, on the same cluster, and prints
// pods/second for both and their ratio.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vramslice/vramslice/e2e/cluster"
)

func main() {
	pods := flag.Int("pods", 1000, "pods per run")
	nodes := flag.Int("nodes", 50, "hollow nodes")
	gpus := flag.Int("gpus", 2, "fake 80 GiB GPUs per node")
	timeout := flag.Duration("timeout", 8*time.Minute, "limit per run")
	flag.Parse()
	if err := run(*pods, *nodes, *gpus, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "vramslice-bench:", err)
		os.Exit(1)
	}
}

func run(nPods, nNodes, nGPUs int, timeout time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	t0 := time.Now()
	c, err := cluster.Start(ctx, cluster.Options{PlainScheduler: true, PluginPollInterval: "2s"})
	if err != nil {
		return err
	}
	defer c.StopQuietly()
	if err := c.StartExtender(); err != nil {
		return err
	}
	names := make([]string, nNodes)
	for i := range names {
		names[i] = fmt.Sprintf("hollow-%02d", i)
		g := make([]cluster.FakeGPU, nGPUs)
		for j := range g {
			g[j] = cluster.GPU(names[i], j, "NVIDIA A100-SXM4-80GB", "80Gi")
		}
		if _, err := c.AddNode(names[i], g); err != nil {
			return err
		}
	}
	if err := c.WaitNodesAdvertise(ctx, names, 3*time.Minute); err != nil {
		return err
	}
	fmt.Printf("cluster: %d hollow nodes x %d GPUs, %d device plugins, extender; ready in %s\n",
		nNodes, nGPUs, nNodes, time.Since(t0).Round(time.Millisecond))

	withExt, err := schedule(ctx, c, "ext", cluster.SchedulerName, nPods, timeout)
	if err != nil {
		return err
	}
	if err := cleanup(ctx, c, "ext", nPods); err != nil {
		return err
	}
	plain, err := schedule(ctx, c, "plain", cluster.PlainScheduler, nPods, timeout)
	if err != nil {
		return err
	}
	fmt.Println()
	fmt.Printf("%d pods onto %d hollow nodes (kube-scheduler v1.34, in-process API server):\n", nPods, nNodes)
	fmt.Printf("  with vramslice-extender (filter+prioritize+bind): %7.1f pods/s (end to end, creation included)\n", withExt)
	fmt.Printf("  plain kube-scheduler, same cluster:                %7.1f pods/s (end to end, creation included)\n", plain)
	fmt.Printf("  ratio extender/plain:                              %7.2f\n", withExt/plain)
	return nil
}

func pod(prefix, scheduler string, i int) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s-%04d", prefix, i), Namespace: "default", Labels: map[string]string{"bench": prefix}},
		Spec: v1.PodSpec{
			SchedulerName: scheduler,
			Containers: []v1.Container{{Name: "main", Image: "registry.k8s.io/pause:3.10", Resources: v1.ResourceRequirements{
				Limits: v1.ResourceList{cluster.ResourceName: *resource.NewQuantity(int64(1+i%4), resource.DecimalSI)},
			}}},
		},
	}
}

// schedule creates n pods for the scheduler and returns pods/second from the
// first create to the moment every pod is bound to a node.
func schedule(ctx context.Context, c *cluster.Cluster, prefix, scheduler string, n int, timeout time.Duration) (float64, error) {
	start := time.Now()
	// Watch for the first bind from the start (creation overlaps scheduling).
	firstBoundCh := make(chan time.Time, 1)
	pollCtx, stopPoll := context.WithCancel(ctx)
	defer stopPoll()
	go func() {
		for pollCtx.Err() == nil {
			list, err := c.Client.CoreV1().Pods("default").List(pollCtx, metav1.ListOptions{LabelSelector: "bench=" + prefix})
			if err == nil {
				for _, p := range list.Items {
					if p.Spec.NodeName != "" {
						firstBoundCh <- time.Now()
						return
					}
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	var created atomic.Int64
	var wg sync.WaitGroup
	errCh := make(chan error, 1)
	work := make(chan int)
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				if _, err := c.Client.CoreV1().Pods("default").Create(ctx, pod(prefix, scheduler, i), metav1.CreateOptions{}); err != nil {
					select {
					case errCh <- err:
					default:
					}
					return
				}
				created.Add(1)
			}
		}()
	}
	go func() {
		for i := 0; i < n; i++ {
			work <- i
		}
		close(work)
	}()
	wg.Wait()
	select {
	case err := <-errCh:
		return 0, fmt.Errorf("creating pods: %w", err)
	default:
	}
	createdIn := time.Since(start)
	deadline := start.Add(timeout)
	var firstBound time.Time
	for {
		list, err := c.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "bench=" + prefix})
		if err != nil {
			return 0, err
		}
		bound, running := 0, 0
		for _, p := range list.Items {
			if p.Spec.NodeName != "" {
				bound++
			}
			if p.Status.Phase == v1.PodRunning {
				running++
			}
		}
		if bound == n {
			stopPoll()
			select {
			case firstBound = <-firstBoundCh:
			default:
				firstBound = start
			}
			d := time.Since(start)
			rate := float64(n) / d.Seconds()
			window := time.Since(firstBound)
			fmt.Printf("[%s] %d pods created in %s; all bound %s after the first create (%.1f pods/s end to end); "+
				"first to last bind %s (%.1f pods/s); %d Running at that moment\n",
				scheduler, n, createdIn.Round(time.Millisecond), d.Round(time.Millisecond), rate,
				window.Round(time.Millisecond), float64(n)/window.Seconds(), running)
			return rate, nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("[%s] only %d of %d pods bound after %s", scheduler, bound, n, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func cleanup(ctx context.Context, c *cluster.Cluster, prefix string, n int) error {
	zero := int64(0)
	if err := c.Client.CoreV1().Pods("default").DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero},
		metav1.ListOptions{LabelSelector: "bench=" + prefix}); err != nil {
		return err
	}
	for i := 0; i < 600; i++ {
		list, err := c.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "bench=" + prefix})
		if err != nil {
			return err
		}
		if len(list.Items) == 0 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("pods of %s not gone after 60s", prefix)
}
