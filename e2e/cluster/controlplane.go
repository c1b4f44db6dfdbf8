package cluster

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	kubeapiservertesting "k8s.io/kubernetes/cmd/kube-apiserver/app/testing"
)

// freePort asks the kernel for a free loopback TCP port. The port is released
// before the caller binds it, so a race with another process is possible but rare.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("finding a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// startEtcd runs an embedded etcd (the version Kubernetes itself pins) on
// loopback ports chosen now, with its data under dir.
func startEtcd(dir string) (*embed.Etcd, string, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	cfg := embed.NewConfig()
	cfg.Name = "e2e"
	cfg.Dir = filepath.Join(dir, "etcd")
	cu, _ := url.Parse("http://127.0.0.1:" + strconv.Itoa(clientPort))
	pu, _ := url.Parse("http://127.0.0.1:" + strconv.Itoa(peerPort))
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.UnsafeNoFsync = true
	cfg.LogLevel = "fatal" // its shutdown is noisy at error level
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", fmt.Errorf("starting embedded etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, "", fmt.Errorf("embedded etcd did not become ready within 60s")
	}
	return e, cu.String(), nil
}

// startAPIServer runs kube-apiserver in this process through Kubernetes' own
// test-server helper: serving certificates, client CA and service-account
// signing key are generated into a temp dir; RBAC is the authorizer.
func startAPIServer(tb *processTB, etcdURL string) (kubeapiservertesting.TestServer, error) {
	storage := storagebackend.NewDefaultConfig("/registry", nil)
	storage.Transport.ServerList = []string{etcdURL}
	flags := []string{
		"--authorization-mode=RBAC",
		"--advertise-address=127.0.0.1",
		"--service-account-lookup=true",
		"--profiling=false",
		"--endpoint-reconciler-type=none", // loopback addresses are not valid endpoints
	}
	return kubeapiservertesting.StartTestServer(tb, kubeapiservertesting.NewDefaultTestServerOptions(), flags, storage)
}

// servingCA returns the PEM of the CA certificate(s) that signed the
// apiserver's serving certificate (found in the test server's cert dir).
func servingCA(certDir string) ([]byte, error) {
	matches, err := filepath.Glob(filepath.Join(certDir, "*.crt"))
	if err != nil {
		return nil, err
	}
	for _, m := range matches {
		base := filepath.Base(m)
		if base != "apiserver.crt" {
			continue
		}
		data, err := os.ReadFile(m)
		if err != nil {
			return nil, err
		}
		var out []byte
		rest := data
		for {
			var block *pem.Block
			block, rest = pem.Decode(rest)
			if block == nil {
				break
			}
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				continue
			}
			if c.IsCA {
				out = append(out, pem.EncodeToMemory(block)...)
			}
		}
		if len(out) == 0 {
			// A self-signed leaf is its own CA.
			return data, nil
		}
		return out, nil
	}
	return nil, fmt.Errorf("no apiserver.crt in %s", certDir)
}

// writeKubeconfig writes a kubeconfig for server/CA with the given bearer token.
func writeKubeconfig(path, server string, ca []byte, user, token string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: user}
	cfg.CurrentContext = "e2e"
	return clientcmd.WriteToFile(*cfg, path)
}

// clientFromKubeconfig builds a clientset from a kubeconfig path.
func clientFromKubeconfig(path string) (*rest.Config, kubernetes.Interface, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, nil, err
	}
	rc.QPS = 1000
	rc.Burst = 2000
	cs, err := kubernetes.NewForConfig(rc)
	return rc, cs, err
}

// waitFor polls cond every interval until it returns true, an error, or the timeout.
func waitFor(ctx context.Context, timeout, interval time.Duration, what string, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for {
		ok, err := cond()
		if err == nil && ok {
			return nil
		}
		lastErr = err
		if time.Now().After(deadline) {
			if lastErr != nil {
				return fmt.Errorf("timed out after %s waiting for %s: %w", timeout, what, lastErr)
			}
			return fmt.Errorf("timed out after %s waiting for %s", timeout, what)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}
