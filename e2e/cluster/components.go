package cluster

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// DRAHeadroom is the agent's dra.headroom in the e2e config: kept free on every GPU, off
// the published capacity.
const DRAHeadroom = "512Mi"

func (c *Cluster) writePluginConfig(n *Node) error {
	for _, f := range []string{"lib/libvramslice_guard.so", "ld.so.preload"} {
		p := filepath.Join(n.Dir, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			return err
		}
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	c.mu.Lock()
	n.MetricsURL = fmt.Sprintf("http://127.0.0.1:%d", port)
	c.mu.Unlock()
	cfg := fmt.Sprintf(`backend: fake
fakeGpuFile: %q
unit: 1Gi
socketDir: %q
podResourcesSocket: %q
nodeName: %q
pollInterval: %s
publish:
  thresholdBytes: 256Mi
  heartbeat: 30s
injection:
  mode: ld-preload-env
  guardLibraryHostPath: %q
  preloadFileHostPath: %q
deviceListStrategy: envvar
accountingRoot: %q
metricsAddr: 127.0.0.1:%d
`, n.FakeGPUFile, n.SocketDir(), n.PodResourcesSocket(), n.Name, c.Opts.PluginPollInterval,
		filepath.Join(n.Dir, "lib/libvramslice_guard.so"), filepath.Join(n.Dir, "ld.so.preload"),
		filepath.Join(n.Dir, "accounting"), port)
	cfg += c.Opts.PluginExtraConfig
	if n.DRA {
		cfg += fmt.Sprintf(`mode: dra
dra:
  registryDir: %q
  pluginDir: %q
  cdiDir: %q
  checkpoint: %q
  headroom: %s
  minPublishInterval: 200ms
`, n.RegistryDir(), n.DRAPluginDir(), n.CDIDir(), filepath.Join(n.Dir, "vramslice-dra", "checkpoint.json"), DRAHeadroom)
	}
	return os.WriteFile(n.PluginConfig, []byte(cfg), 0o644)
}

// StartPlugin starts (or restarts) the device plugin of a node.
func (c *Cluster) StartPlugin(name string) error {
	n := c.Node(name)
	if n == nil {
		return fmt.Errorf("no node %s", name)
	}
	p, err := startProcess("device-plugin/"+name, c.Bin("vramslice-device-plugin"),
		[]string{"--config", n.PluginConfig, "--kubeconfig", c.pluginKC, "--log-format", "text"},
		filepath.Join(c.Dir, "logs", "device-plugin-"+name+".log"))
	if err != nil {
		return err
	}
	c.mu.Lock()
	n.Plugin = p
	c.mu.Unlock()
	return nil
}

// KillPlugin SIGKILLs a node's device plugin.
func (c *Cluster) KillPlugin(name string) {
	if n := c.Node(name); n != nil {
		n.Plugin.Kill()
	}
}

// StartExtender starts (or restarts) vramslice-extender on the port the scheduler calls.
func (c *Cluster) StartExtender() error {
	cfgPath := filepath.Join(c.Dir, "extender.yaml")
	cfg := fmt.Sprintf("listenAddr: 127.0.0.1:%d\nmetricsAddr: 127.0.0.1:%d\nresources: [%s]\n%s",
		c.extenderPort, c.metricsPort, ResourceName, c.Opts.ExtenderExtraConfig)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return err
	}
	p, err := startProcess("extender", c.Bin("vramslice-extender"),
		[]string{"--config", cfgPath, "--kubeconfig", c.extenderKC, "--log-format", "text"},
		filepath.Join(c.Dir, "logs", "extender.log"))
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.Extender = p
	c.mu.Unlock()
	return c.waitExtenderReady(60 * time.Second)
}

func (c *Cluster) waitExtenderReady(timeout time.Duration) error {
	return waitFor(c.ctx, timeout, 100*time.Millisecond, "extender /readyz", func() (bool, error) {
		if exited, err := c.Extender.Exited(); exited {
			return false, fmt.Errorf("extender exited (%v); log tail:\n%s", err, c.Extender.Tail(2000))
		}
		resp, err := http.Get(c.ExtenderMetricsURL + "/readyz")
		if err != nil {
			return false, err
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
}

// KillExtender SIGKILLs the extender.
func (c *Cluster) KillExtender() { c.Extender.Kill() }
