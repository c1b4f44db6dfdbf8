package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// PrintGpuNodesWide prints what `kubectl get gpunodes -o wide` prints: the
// server-side Table of the CRD's printer columns, wide columns included.
func (c *Cluster) PrintGpuNodesWide(ctx context.Context, w io.Writer) error {
	raw, err := c.Client.CoreV1().RESTClient().Get().AbsPath("/apis/vramslice.io/v1alpha1/gpunodes").
		SetHeader("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io").DoRaw(ctx)
	if err != nil {
		return fmt.Errorf("listing gpunodes as a table: %w", err)
	}
	var t metav1.Table
	if err := json.Unmarshal(raw, &t); err != nil {
		return fmt.Errorf("decoding gpunodes table: %w", err)
	}
	tw := tabwriter.NewWriter(w, 0, 8, 3, ' ', 0)
	head := make([]string, 0, len(t.ColumnDefinitions))
	for _, cd := range t.ColumnDefinitions {
		head = append(head, strings.ToUpper(cd.Name))
	}
	fmt.Fprintln(tw, strings.Join(head, "\t"))
	if len(t.Rows) == 0 {
		fmt.Fprintln(tw, "(no gpunodes yet)")
	}
	for _, r := range t.Rows {
		cells := make([]string, 0, len(r.Cells))
		for _, cell := range r.Cells {
			if cell == nil {
				cells = append(cells, "<none>")
			} else {
				cells = append(cells, fmt.Sprint(cell))
			}
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

// ContainerEnv returns the env a hollow node recorded for a pod's container.
func ContainerEnv(pod *v1.Pod, container string) map[string]string {
	var ro PodRunOptions
	if err := json.Unmarshal([]byte(pod.Annotations[RunOptionsAnnotation]), &ro); err != nil {
		return nil
	}
	return ro[container].Env
}

// PrintPlacements prints, for every pod in ns, where it landed and with which limit.
func (c *Cluster) PrintPlacements(ctx context.Context, w io.Writer, ns string) error {
	pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	sort.Slice(pods.Items, func(i, j int) bool { return pods.Items[i].Name < pods.Items[j].Name })
	tw := tabwriter.NewWriter(w, 0, 8, 3, ' ', 0)
	fmt.Fprintln(tw, "POD\tREQUEST\tNODE\tGPU\tLIMIT (container env)\tSTATUS")
	for i := range pods.Items {
		p := &pods.Items[i]
		req := int64(0)
		for _, ctr := range p.Spec.Containers {
			if q, ok := ctr.Resources.Limits[ResourceName]; ok {
				req += q.Value()
			}
		}
		node, gpu, limit := p.Spec.NodeName, p.Annotations[AnnotationGPUUUID], ""
		for _, ctr := range p.Spec.Containers {
			if env := ContainerEnv(p, ctr.Name); env != nil && env["VRAMSLICE_VRAM_LIMIT_BYTES"] != "" {
				b, _ := strconv.ParseInt(env["VRAMSLICE_VRAM_LIMIT_BYTES"], 10, 64)
				limit = fmt.Sprintf("%s=%s (%d GiB)", ctr.Name, env["VRAMSLICE_VRAM_LIMIT_BYTES"], b>>30)
				if gpu == "" {
					gpu = env["VRAMSLICE_GPU_UUID"]
				}
			}
		}
		status := string(p.Status.Phase)
		for _, cond := range p.Status.Conditions {
			if cond.Type == v1.PodScheduled && cond.Status == v1.ConditionFalse {
				status += ": " + cond.Message
			}
		}
		if p.Status.Reason != "" {
			status += " (" + p.Status.Reason + ")"
		}
		fmt.Fprintf(tw, "%s\t%d GiB\t%s\t%s\t%s\t%s\n", p.Name, req, dash(node), dash(gpu), dash(limit), status)
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
