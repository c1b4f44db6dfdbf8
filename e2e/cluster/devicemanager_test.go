package cluster

import (
	"bytes"
	"go/ast"
	"go/parser"
	"go/printer"
	"go/token"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// TestDeviceManagerLinknameSignature reads the kubelet's devicemanager package
// from the module graph and checks that newManagerImpl, reached through
// //go:linkname in devicemanager.go, has exactly the parameters and results of the
// declaration there, with the same packages behind the qualifiers. The linker
// only matches the symbol's name, so without this a Kubernetes bump that changed
// the constructor would call it with the wrong arguments instead of failing.
func TestDeviceManagerLinknameSignature(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", "{{.Dir}}", "k8s.io/kubernetes/pkg/kubelet/cm/devicemanager").CombinedOutput()
	if err != nil {
		t.Fatalf("locating the devicemanager package: %v\n%s", err, out)
	}
	dir := strings.TrimSpace(string(out))
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	ours, ourImports, _ := funcDecl(t, "devicemanager.go")
	if ours == "" {
		t.Fatal("devicemanager.go declares no newManagerImpl")
	}
	// Upstream's result is its own package's *ManagerImpl.
	ours = strings.ReplaceAll(ours, "*devicemanager.ManagerImpl", "*ManagerImpl")
	var found bool
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		theirs, theirImports, pos := funcDecl(t, name)
		if theirs == "" {
			continue
		}
		found = true
		if theirs != ours {
			t.Fatalf("%s: newManagerImpl is now\n  func newManagerImpl%s\nbut cluster/devicemanager.go links to it as\n  func newManagerImpl%s\nupdate the //go:linkname declaration to the new signature", pos, theirs, ours)
		}
		for _, qual := range regexp.MustCompile(`\b([A-Za-z_][A-Za-z0-9_]*)\.`).FindAllStringSubmatch(theirs, -1) {
			q := qual[1]
			if theirImports[q] != ourImports[q] {
				t.Fatalf("%s: qualifier %s names %q upstream but %q in cluster/devicemanager.go", pos, q, theirImports[q], ourImports[q])
			}
		}
	}
	if !found {
		t.Fatalf("no func newManagerImpl in %s: the //go:linkname in cluster/devicemanager.go points at nothing", dir)
	}
}

var majorVersion = regexp.MustCompile(`^v[0-9]+$`)

// funcDecl returns the printed type of the top-level func newManagerImpl in the
// file (without "func"), the file's imports by local name, and the position.
func funcDecl(t *testing.T, path string) (string, map[string]string, string) {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	imports := map[string]string{}
	for _, imp := range f.Imports {
		p, _ := strconv.Unquote(imp.Path.Value)
		elems := strings.Split(p, "/")
		local := elems[len(elems)-1]
		if len(elems) > 1 && majorVersion.MatchString(local) {
			local = elems[len(elems)-2] // k8s.io/klog/v2 is package klog
		}
		if imp.Name != nil {
			local = imp.Name.Name
		}
		imports[local] = p
	}
	for _, d := range f.Decls {
		fn, ok := d.(*ast.FuncDecl)
		if !ok || fn.Recv != nil || fn.Name.Name != "newManagerImpl" {
			continue
		}
		var buf bytes.Buffer
		if err := printer.Fprint(&buf, fset, fn.Type); err != nil {
			t.Fatal(err)
		}
		return strings.TrimPrefix(buf.String(), "func"), imports, fset.Position(fn.Pos()).String()
	}
	return "", imports, ""
}
