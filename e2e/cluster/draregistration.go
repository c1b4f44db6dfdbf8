package cluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	pluginwatchercache "k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
)

// DRARegistration says how a DRA node's registration socket reaches the DRA manager
// ($VRAMSLICE_E2E_DRA_REGISTRATION):
//
//   - "pluginmanager" (default): the kubelet's own plugin manager (pkg/kubelet/pluginmanager)
//     watches the registry directory and calls the agent's GetInfo as a kubelet does. Its
//     v1.37.2 dial sets no authority, so grpc-go sends the socket path as :authority; the
//     agent's registration socket rewrites it (vramslice-dra's authority shim), without which
//     h2 resets the stream with PROTOCOL_ERROR and the driver never registers;
//   - "direct": registerDRAPlugins below — the hollow node watches the registry directory
//     itself, calls GetInfo with the :authority "localhost", and hands the plugin to the DRA
//     manager's registration handler (ValidatePlugin, RegisterPlugin, then
//     NotifyRegistrationStatus), as the plugin manager does.
func DRARegistration() string {
	if v := os.Getenv("VRAMSLICE_E2E_DRA_REGISTRATION"); v != "" {
		return v
	}
	return "pluginmanager"
}

// registerDRAPlugins polls the registry directory (as the plugin watcher does, every 100 ms)
// and registers every new or re-created *-reg.sock of type DRAPlugin with handler.
func (h *HollowNode) registerDRAPlugins(ctx context.Context, handler pluginwatchercache.PluginHandler) {
	logger := klog.FromContext(ctx).WithName("registration")
	type registered struct {
		mod            time.Time
		name, endpoint string
	}
	seen := map[string]registered{}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		entries, _ := os.ReadDir(h.RegistryDir())
		present := map[string]bool{}
		for _, e := range entries {
			if !strings.HasSuffix(e.Name(), "-reg.sock") {
				continue
			}
			path := filepath.Join(h.RegistryDir(), e.Name())
			info, err := os.Stat(path)
			if err != nil || info.Mode()&os.ModeSocket == 0 {
				continue
			}
			present[path] = true
			if old, ok := seen[path]; ok && old.mod.Equal(info.ModTime()) {
				continue
			}
			if old, ok := seen[path]; ok {
				handler.DeRegisterPlugin(ctx, old.name, old.endpoint)
				delete(seen, path)
			}
			name, endpoint, err := registerDRAPlugin(ctx, path, handler)
			if err != nil {
				logger.Info("DRA plugin registration failed; retrying", "socket", path, "err", err)
				continue
			}
			logger.Info("Registered DRA plugin", "socket", path, "driver", name, "endpoint", endpoint)
			seen[path] = registered{mod: info.ModTime(), name: name, endpoint: endpoint}
		}
		for path, r := range seen {
			if !present[path] {
				handler.DeRegisterPlugin(ctx, r.name, r.endpoint)
				delete(seen, path)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// registerDRAPlugin is the plugin manager's register operation for one socket.
func registerDRAPlugin(ctx context.Context, socket string, handler pluginwatchercache.PluginHandler) (string, string, error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix:"+socket, grpc.WithAuthority("localhost"),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		}))
	if err != nil {
		return "", "", err
	}
	defer conn.Close()
	client := registerapi.NewRegistrationClient(conn)
	info, err := client.GetInfo(dctx, &registerapi.InfoRequest{})
	if err != nil {
		return "", "", fmt.Errorf("GetInfo: %w", err)
	}
	if info.Type != registerapi.DRAPlugin {
		return "", "", fmt.Errorf("plugin type %q, want %q", info.Type, registerapi.DRAPlugin)
	}
	notify := func(regErr error) {
		st := &registerapi.RegistrationStatus{PluginRegistered: regErr == nil}
		if regErr != nil {
			st.Error = regErr.Error()
		}
		_, _ = client.NotifyRegistrationStatus(dctx, st)
	}
	if err := handler.ValidatePlugin(ctx, info.Name, info.Endpoint, info.SupportedVersions); err != nil {
		notify(err)
		return "", "", fmt.Errorf("ValidatePlugin: %w", err)
	}
	if err := handler.RegisterPlugin(ctx, info.Name, info.Endpoint, info.SupportedVersions, nil); err != nil {
		notify(err)
		return "", "", fmt.Errorf("RegisterPlugin: %w", err)
	}
	notify(nil)
	return info.Name, info.Endpoint, nil
}
