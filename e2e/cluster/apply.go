package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// Applier creates the objects of multi-document YAML files (create, or
// replace when they exist) through the dynamic client, like `kubectl apply` for
// the simple objects the e2e cluster needs.
type Applier struct {
	dyn    dynamic.Interface
	mapper *restmapper.DeferredDiscoveryRESTMapper
}

// NewApplier builds an Applier for the cluster behind cfg.
func NewApplier(cfg *rest.Config) (*Applier, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	return &Applier{dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))}, nil
}

// ApplyFile applies every object in a YAML file; defaultNS is used for
// namespaced objects without one. It returns the objects as applied.
func (a *Applier) ApplyFile(ctx context.Context, path, defaultNS string) ([]*unstructured.Unstructured, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	objs, err := a.ApplyYAML(ctx, data, defaultNS)
	if err != nil {
		return objs, fmt.Errorf("%s: %w", path, err)
	}
	return objs, nil
}

// ApplyYAML applies every object in a multi-document YAML stream.
func (a *Applier) ApplyYAML(ctx context.Context, data []byte, defaultNS string) ([]*unstructured.Unstructured, error) {
	return a.ApplyYAMLKinds(ctx, data, defaultNS, nil)
}

// ApplyYAMLKinds applies the objects of a multi-document YAML stream whose kind
// is in kinds (all objects when kinds is nil).
func (a *Applier) ApplyYAMLKinds(ctx context.Context, data []byte, defaultNS string, kinds map[string]bool) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var out []*unstructured.Unstructured
	for {
		obj := &unstructured.Unstructured{}
		if err := dec.Decode(&obj.Object); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return out, fmt.Errorf("decoding YAML: %w", err)
		}
		if len(obj.Object) == 0 || (kinds != nil && !kinds[obj.GetKind()]) {
			continue
		}
		applied, err := a.apply(ctx, obj, defaultNS)
		if err != nil {
			return out, fmt.Errorf("%s %s: %w", obj.GetKind(), obj.GetName(), err)
		}
		out = append(out, applied)
	}
}

func (a *Applier) apply(ctx context.Context, obj *unstructured.Unstructured, defaultNS string) (*unstructured.Unstructured, error) {
	gvk := obj.GroupVersionKind()
	var mapping *meta.RESTMapping
	// A just-created CRD takes a moment to appear in discovery.
	err := waitFor(ctx, 30*time.Second, 200*time.Millisecond, "API mapping for "+gvk.String(), func() (bool, error) {
		m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			a.mapper.Reset()
			return false, err
		}
		mapping = m
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	var ri dynamic.ResourceInterface = a.dyn.Resource(mapping.Resource)
	if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
		if obj.GetNamespace() == "" {
			obj.SetNamespace(defaultNS)
		}
		ri = a.dyn.Resource(mapping.Resource).Namespace(obj.GetNamespace())
	}
	created, err := ri.Create(ctx, obj, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		cur, gerr := ri.Get(ctx, obj.GetName(), metav1.GetOptions{})
		if gerr != nil {
			return nil, gerr
		}
		obj.SetResourceVersion(cur.GetResourceVersion())
		return ri.Update(ctx, obj, metav1.UpdateOptions{})
	}
	return created, err
}
