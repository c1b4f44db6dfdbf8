package cluster

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-scheduler/app/options"
	"k8s.io/kubernetes/pkg/scheduler/apis/config/validation"
	"sigs.k8s.io/yaml"
)

// The chart's bundled kube-scheduler: its scheduler-config.yaml and its container arguments,
// as the chart renders them, are read by kube-scheduler's own flag set and config loader (the
// v1.37.2 code the e2e cluster runs) and validated by its own rules. The scenarios start their
// scheduler from a config of their own; without this, a flag removed upstream or a config key
// the scheduler rejects would first show as a crash-looping pod after `helm upgrade`.
func TestTheChartsSchedulerConfigAndFlagsAreKubeSchedulers(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	rendered, err := os.ReadFile(filepath.Join(root, "manifests", "vramslice.yaml"))
	if err != nil {
		t.Fatalf("reading the rendered manifests: %v", err)
	}
	helm := strings.TrimSpace(runCommand(t, root, filepath.Join(root, "scripts", "install-helm.sh")))
	ha := runCommand(t, root, helm, "template", "vramslice", filepath.Join(root, "charts", "vramslice"),
		"--namespace", "vramslice-system", "--kube-version", "v1.37.2",
		"--set", "scheduler.replicas=3")
	for name, text := range map[string]string{"manifests/vramslice.yaml": string(rendered), "replicas=3": ha} {
		t.Run(name, func(t *testing.T) {
			config, args := schedulerOfChart(t, text)
			path := filepath.Join(t.TempDir(), "scheduler-config.yaml")
			if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
				t.Fatal(err)
			}
			o := options.NewOptions()
			fs := pflag.NewFlagSet("kube-scheduler", pflag.ContinueOnError)
			for _, set := range o.Flags.FlagSets {
				fs.AddFlagSet(set)
			}
			var given []string
			for _, arg := range args {
				if strings.HasPrefix(arg, "--config=") {
					arg = "--config=" + path
				}
				given = append(given, arg)
			}
			if err := fs.Parse(given); err != nil {
				t.Fatalf("kube-scheduler refuses the chart's arguments %q: %v", args, err)
			}
			if o.ConfigFile != path {
				t.Fatalf("the chart passes no --config: %q", args)
			}
			cfg, err := options.LoadConfigFromFile(klog.Background(), o.ConfigFile)
			if err != nil {
				t.Fatalf("kube-scheduler cannot load the chart's scheduler-config.yaml: %v\n%s", err, config)
			}
			if err := validation.ValidateKubeSchedulerConfiguration(cfg); err != nil {
				t.Fatalf("kube-scheduler rejects the chart's scheduler-config.yaml: %v\n%s", err, config)
			}
			o.ComponentConfig = cfg
			if errs := o.Validate(); len(errs) > 0 {
				t.Fatalf("kube-scheduler rejects the chart's options: %v", errs)
			}
			if len(cfg.Profiles) != 1 || cfg.Profiles[0].SchedulerName != "vramslice-scheduler" {
				t.Errorf("profiles %+v, want one named vramslice-scheduler", cfg.Profiles)
			}
			if len(cfg.Extenders) != 1 {
				t.Fatalf("extenders %+v, want one", cfg.Extenders)
			}
			ext := cfg.Extenders[0]
			if ext.URLPrefix != "http://127.0.0.1:8888" || ext.Weight != 5 || ext.FilterVerb != "filter" ||
				ext.PrioritizeVerb != "prioritize" || ext.BindVerb != "bind" || !ext.NodeCacheCapable ||
				ext.Ignorable || len(ext.ManagedResources) != 1 ||
				ext.ManagedResources[0].Name != "vramslice.io/vram-gib" {
				t.Errorf("the extender as kube-scheduler reads it: %+v", ext)
			}
			if cfg.PercentageOfNodesToScore == nil || *cfg.PercentageOfNodesToScore != 100 {
				t.Errorf("percentageOfNodesToScore %v, want 100: the extender must judge every feasible node",
					cfg.PercentageOfNodesToScore)
			}
			// Leader election is on with one replica too: scaling up never rolls electing pods
			// out beside one that does not elect.
			if !cfg.LeaderElection.LeaderElect {
				t.Errorf("leaderElect false, want true")
			}
			if cfg.LeaderElection.ResourceName != "vramslice-scheduler" ||
				cfg.LeaderElection.ResourceNamespace != "vramslice-system" {
				t.Errorf("the lease kube-scheduler takes: %s/%s", cfg.LeaderElection.ResourceNamespace,
					cfg.LeaderElection.ResourceName)
			}
			if o.Deprecated.PodMaxInUnschedulablePodsDuration != UnschedulableFlush {
				t.Errorf("--pod-max-in-unschedulable-pods-duration is %v, the e2e scheduler's %v",
					o.Deprecated.PodMaxInUnschedulablePodsDuration, UnschedulableFlush)
			}
		})
	}
}

// runCommand runs a command in dir and returns its stdout; a failure fails the test with stderr.
func runCommand(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, errOut.String())
	}
	return out.String()
}

// schedulerOfChart finds, in rendered manifests, the scheduler ConfigMap's
// scheduler-config.yaml and the kube-scheduler container's arguments.
func schedulerOfChart(t *testing.T, rendered string) (string, []string) {
	t.Helper()
	var config string
	var args []string
	for _, doc := range strings.Split(rendered, "\n---") {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatalf("a rendered document does not parse: %v", err)
		}
		switch meta.Kind {
		case "ConfigMap":
			var cm v1.ConfigMap
			if err := yaml.Unmarshal([]byte(doc), &cm); err != nil {
				t.Fatal(err)
			}
			if c, ok := cm.Data["scheduler-config.yaml"]; ok {
				config = c
			}
		case "Deployment":
			var d appsv1.Deployment
			if err := yaml.Unmarshal([]byte(doc), &d); err != nil {
				t.Fatal(err)
			}
			for _, c := range d.Spec.Template.Spec.Containers {
				if c.Name == "kube-scheduler" {
					args = append(append([]string{}, c.Command[1:]...), c.Args...)
				}
			}
		}
	}
	if config == "" || args == nil {
		t.Fatalf("no scheduler-config.yaml (%d bytes) or kube-scheduler container (%d args) in the rendering",
			len(config), len(args))
	}
	return config, args
}
