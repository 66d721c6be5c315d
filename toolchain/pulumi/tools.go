//go:build tools

// Package toolchain pins the Pulumi CLI so `go build` can build it from the module proxy.
// The CLI's own go.mod carries replace directives, which `go install pkg@version` refuses.
package toolchain

import (
	_ "github.com/pulumi/pulumi/pkg/v3/cmd/pulumi"
)
