// Command kubectl is the upstream kubectl (k8s.io/kubectl, the same v1.37.2 as the
// e2e cluster), built from this module so the e2e scripts and the demo need no
// system kubectl: `e2e/bin/kubectl --kubeconfig <admin.kubeconfig> get gpunodes -o wide`.
package main

import (
	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	command := cmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
}
